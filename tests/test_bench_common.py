"""benchmarks/bench_common.py's patch tokens: each names a setting that sumtune has, so an A/B row measures what
its name says (a renamed constant would otherwise be patched onto the module as a new, unread attribute)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_common as bc  # noqa: E402


@pytest.mark.parametrize("token", sorted(bc.PATCH_TOKENS))
def test_every_patch_token_names_an_existing_setting(token):
    module_name, name, _ = bc.PATCH_TOKENS[token]
    assert hasattr(importlib.import_module(module_name), name), f"{token}: {module_name}.{name} does not exist"


def test_patches_set_their_settings_for_the_block_only():
    from sumtune.fast_t5 import far_split

    before = (far_split.FAR_SPLIT_WITHOUT_GRAD, far_split.FAR_SPLIT_MIN_KEYS)
    with bc.patched("nofarsplit:farsplitall"):
        assert (far_split.FAR_SPLIT_WITHOUT_GRAD, far_split.FAR_SPLIT_MIN_KEYS) == (False, 0)
    assert (far_split.FAR_SPLIT_WITHOUT_GRAD, far_split.FAR_SPLIT_MIN_KEYS) == before


def test_an_unknown_patch_token_ends_the_run_with_its_name():
    with pytest.raises(SystemExit, match="nosuchtoken"):
        bc.patch_strings("nofarsplit,farsplitall:nosuchtoken")
