"""Files written whole or not at all; damaged safetensors recognized from their header and size; output paths and
input paths of the wrong kind refused in one sentence (sumtune.safe_io)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sumtune import safe_io
from sumtune.errors import SumtuneError


def test_atomic_write_replaces_whole_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    safe_io.atomic_write_text(target, "first\n")
    safe_io.atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # no temporary file left


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that dies before the rename (disk full, a kill) leaves the old file byte for byte."""
    target = tmp_path / "README.md"
    target.write_text("the user's card\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="injected"):
        safe_io.atomic_write_text(target, "a new card that never lands\n")
    assert target.read_text() == "the user's card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_files_replaced_atomically_all_or_nothing(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"old weights")
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        with safe_io.files_replaced_atomically(tmp_path) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half of the new")
            raise RuntimeError("killed while saving")
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"old weights"
    with safe_io.files_replaced_atomically(tmp_path) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new weights")
        (tmp / "adapter_config.json").write_text("{}")
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "notes.txt"]


@pytest.fixture()
def weights(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32), "b": torch.ones(3, 4)}, str(path),
              metadata={"format": "pt"})
    return path


DAMAGE = {
    "cut-short": lambda data: data[:-7],
    "cut-in-header": lambda data: data[:20],
    "too-short-for-a-header": lambda data: data[:5],
    "empty": lambda data: b"",
    "extra-bytes": lambda data: data + b"\0" * 4,
    "header-length-garbage": lambda data: struct.pack("<Q", 2**40) + data[8:],
    "header-not-json": lambda data: data[:8] + b"!" * (len(data) - 8),
    "overwritten-with-text": lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_safetensors_are_recognized_as_safetensors_itself_would(kind, weights):
    assert safe_io.safetensors_problem(weights) is None
    load_file(str(weights))  # whole
    weights.write_bytes(DAMAGE[kind](weights.read_bytes()))
    with pytest.raises(SafetensorError):  # the library agrees it is unreadable ...
        load_file(str(weights))
    with pytest.raises(SumtuneError, match=r"^Model weights file '.*w\.safetensors' is damaged: .+\.$"):
        safe_io.check_safetensors(weights, "Model weights file")  # ... and sumtune says so in one sentence


def test_output_location(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert safe_io.check_output_location(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check, not a write
    with pytest.raises(SumtuneError, match="exists and is a file, not a directory"):
        safe_io.check_output_location(a_file)
    with pytest.raises(SumtuneError, match=r"cannot be created: '.*a_file' is a file, not a directory"):
        safe_io.check_output_location(a_file / "sub" / "run")
    with pytest.raises(SumtuneError, match="exists and is a directory, not a file"):
        safe_io.check_output_location(tmp_path, "Report file", is_file=True)
    with pytest.raises(SumtuneError, match="must not be empty"):
        safe_io.check_output_location("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: play the kernel's refusal
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked and mode & os.W_OK
                            else real_access(p, mode, *a, **k))
    with pytest.raises(SumtuneError, match="is not writable"):
        safe_io.check_output_location(locked)
    with pytest.raises(SumtuneError, match=r"cannot be created: '.*locked' is not writable"):
        safe_io.check_output_location(locked / "run")


def test_paths_of_the_wrong_kind_are_named_as_such(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SumtuneError, match=r"^Run directory '.*a_file' is a file, not a directory\.$"):
        safe_io.require_dir(a_file, "Run directory")
    with pytest.raises(SumtuneError, match=r"^Input file '.*' is a directory, not a file\.$"):
        safe_io.require_file(tmp_path, "Input file")
    with pytest.raises(SumtuneError, match="does not exist"):
        safe_io.require_dir(tmp_path / "nope", "Run directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(SumtuneError, match="is a broken link"):
        safe_io.require_file(tmp_path / "dangling", "Input file")
