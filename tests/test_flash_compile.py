"""sumtune.fast_t5.flash_compile: the attention kernels built for Hopper (sm_90) on any machine, no GPU.

Each test compiles in a process without Triton's interpreter (the `compiled_for_hopper` fixture) and checks what a
GPU run would hit first (shared memory, spills, a config that does not build) or what a flag is for (the loop bodies'
instructions, the Philox multiplies, TMA copies). Counts are Triton 3.6's (the GPU image's) unless a test says so.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_autotune_config_compiles_for_hopper_without_spilling():
    """triton.compile for sm_90 on CPU (sumtune.fast_t5.flash_compile, in a process without the interpreter):
    each shipped config of the encoder variant (bias, padding, dropout) and the first of the decoder's (causal)
    builds, fits the 227 KiB of shared memory of an H100/H200, and spills at most a few dozen bytes at head_dim
    128 (an autotune config that does not compile would crash the first training step on a GPU)."""
    import json
    import subprocess
    import sys

    from sumtune.fast_t5.flash_attention import AUTOTUNE_CONFIGS
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = []
    for extra in ([], ["--causal", "--first-only"]):
        result = subprocess.run([sys.executable, "-m", "sumtune.fast_t5.flash_compile", "--json", "--head-dims", "128",
                                 *extra], env=env, capture_output=True, text=True, timeout=600)
        rows += [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == sum(len(configs) for configs in AUTOTUNE_CONFIGS.values()) + 3, result.stderr[-2000:]
    for row in rows:
        assert "error" not in row, row
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["spill_bytes"] <= 256, row  # the rejected 4-warp 128-wide tiles spilled 1-5 KB
        assert row["async_copies"] > 0, row  # K/V loads pipelined (cp.async), not synchronous


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_dkdv_configs_that_store_ds_compile_for_hopper_without_spilling(compiled_for_hopper):
    """The DS_GEMM variant of the dK/dV kernel (it also stores dS) builds for sm_90 with every shipped config."""
    from sumtune.fast_t5.flash_attention import AUTOTUNE_CONFIGS
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(
        "import json; from sumtune.fast_t5 import flash_compile as fc, flash_attention as fa\n"
        "for config in fa.AUTOTUNE_CONFIGS['dkdv']:\n"
        "    print(json.dumps(fc.resources(fc.compile_kernel('dkdv', *config, STORE_DS=True))))")
    assert len(rows) == len(AUTOTUNE_CONFIGS["dkdv"]), stderr
    for row in rows:
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES and row["spill_bytes"] <= 256, row


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_descriptor_configs_compile_for_hopper_with_tma(compiled_for_hopper):
    """FWD_DESCRIPTORS' tiles build for sm_90 (bias band, padding, with and without dropout) within Hopper's shared
    memory, with K and V by TMA (bulk tensor copies) and at most a few hundred bytes of spill (Triton 3.6, the GPU
    image's: up to 32; 3.9: 144-264 at 128 x 128 tiles, not the kilobytes of tiles too large for their warps); so do
    BWD_DESCRIPTORS' (the dK/dV kernel's tiles, storing dS).
    128 x 128 x 8 x 3 fits the forward, by TMA or by pointers, only with the near loop at 2 stages (near_stages):
    with 3 it takes the bias tile's two extra buffers too."""
    from sumtune.fast_t5.flash_attention import AUTOTUNE_CONFIGS, FWD_DESCRIPTOR_CONFIGS, near_stages
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(
        "import json; from sumtune.fast_t5 import flash_compile as fc, flash_attention as fa\n"
        "for config in fa.FWD_DESCRIPTOR_CONFIGS:\n"
        "    for dropout in (False, True):\n"
        "        c = fc.compile_kernel('fwd', *config, DESC=True, DROPOUT=dropout)\n"
        "        print(json.dumps(dict(fc.resources(c), bulk=c.asm['ptx'].count('cp.async.bulk.tensor'))))\n"
        "for config in fa.AUTOTUNE_CONFIGS['dkdv']:\n"
        "    c = fc.compile_kernel('dkdv', *config, DESC=True, STORE_DS=True)\n"
        "    print(json.dumps(dict(fc.resources(c), bulk=c.asm['ptx'].count('cp.async.bulk.tensor'))))\n"
        "for desc, near in ((False, 2), (False, None)):\n"
        "    c = fc.compile_kernel('fwd', 128, 128, 8, 3, DESC=desc, NEAR_STAGES=near)\n"
        "    print(json.dumps(dict(fc.resources(c), bulk=-1, near=near)))")
    assert len(rows) == 2 * len(FWD_DESCRIPTOR_CONFIGS) + len(AUTOTUNE_CONFIGS["dkdv"]) + 2, stderr
    for row in rows[:-1]:
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES and row["spill_bytes"] <= 512 and row["bulk"] != 0, row
    assert rows[-1]["shared_bytes"] > HOPPER_SHARED_BYTES, rows[-1]  # the near loop at the launch's 3 stages
    assert near_stages("fwd", 128, 128, 3) == near_stages("fwd_desc", 128, 128, 3) == {"NEAR_STAGES": 2}
    assert near_stages("fwd", 128, 64, 3) == near_stages("fwd", 128, 128, 2) == near_stages("dq", 128, 128, 3) == {}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_lean_forward_loops_issue_fewer_instructions_in_the_hopper_build(compiled_for_hopper):
    """LEAN_FORWARD compiled for sm_90 (128 x 64 x 8 x 3, bias band, padding; with and without dropout): it fits
    Hopper's shared memory with at most a few hundred bytes of spill, and each of its three lean loops (far left,
    near, far right: no FSEL, no mask) issues at most 4/5 of the instructions of the masked loop it stands beside,
    the same tensor-core instructions (Triton 3.6: 348 against 699 in the far loops without dropout, 665 against
    1029 with it; results/attention_lean_compile-2026-12-04-cpu-sm90.json)."""
    builds = [("(128, 64, 8, 3)", "DROPOUT=False"), ("(128, 64, 8, 3)", "DROPOUT=True")]
    for masked, lean in _lean_builds(compiled_for_hopper, "LEAN_FORWARD", "fwd", builds):
        assert [bool(loop.get("FSEL")) for loop in lean] == [False, True] * 3  # lean, masked; x 3 regions
        for before, after in zip(masked, lean[::2]):
            assert after["HGMMA"] == before["HGMMA"] and after["total"] <= 0.8 * before["total"], (before, after)


def _lean_builds(compiled_for_hopper, flag: str, kernel: str, builds: list[tuple[str, str]]) -> list[tuple]:
    """(masked loops, lean loops) of ``kernel`` compiled for sm_90 with ``flag`` off and on, for each (tile, build
    flags) of ``builds``: three masked main loops, six lean ones (each region's lean loop, then its masked one); each
    build fits Hopper's shared memory with at most a few hundred bytes of spill."""
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(
        "import json; from sumtune.fast_t5 import flash_compile as fc\n"
        f"builds = [{', '.join(f'({tile}, dict({flags}))' for tile, flags in builds)}]\n"
        f"for row in fc.loops_off_and_on('{kernel}', '{flag}', builds):\n"
        "    print(json.dumps(row))")
    assert len(rows) == 2 * len(builds), stderr
    pairs = []
    for masked, lean in zip(rows[::2], rows[1::2]):
        assert not masked[flag] and lean[flag], (masked, lean)
        assert lean["shared_bytes"] <= HOPPER_SHARED_BYTES and lean["spill_bytes"] <= 256, lean
        assert [len(masked["loops"]), len(lean["loops"])] == [3, 6], (masked["loops"], lean["loops"])
        pairs.append((masked["loops"], lean["loops"]))
    return pairs


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_lean_backward_loops_issue_fewer_instructions_in_the_hopper_build(compiled_for_hopper):
    """LEAN_BACKWARD compiled for sm_90 (the dK/dV kernel at 32 x 64 x 4 x 3 and 32 x 128 x 8 x 3, storing dS, bias
    band, padding, dropout): it fits Hopper's shared memory with at most a few hundred bytes of spill, and each of
    its three lean loops issues at most 9/10 of the instructions of the masked loop it stands beside, the same
    tensor-core instructions (Triton 3.6, 32 x 64 with dropout: 529 / 572 / 533 against 640 / 686 / 650;
    results/kernel_loops-2026-12-05-cpu-sm90-lean-backward.json; with Triton 3.9 only the selects go)."""
    import triton

    builds = [("(32, 64, 4, 3)", "STORE_DS=True"), ("(32, 128, 8, 3)", "STORE_DS=True")]
    for masked, lean in _lean_builds(compiled_for_hopper, "LEAN_BACKWARD", "dkdv", builds):
        for before, after in zip(masked, lean[::2]):
            assert after["HGMMA"] == before["HGMMA"] and after.get("FSEL", 0) < before["FSEL"], (before, after)
            # Triton 3.9 (the newest pip allows) compiles the masked loops shorter and spills in the lean build, whose
            # loops then come out no shorter: the count is the GPU image's compiler's (3.6), where the flag is timed
            if triton.__version__.startswith("3.6"):
                assert after["total"] <= 0.9 * before["total"], (before, after)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_pair_draws_let_the_dkdv_kernel_build_its_mask_without_shared_memory(compiled_for_hopper):
    """Compiled for sm_90: with `PAIRS` the dK/dV kernel's dropout adds no shared-memory load, store or barrier to
    its code (the draws are built in its own layout), where the Philox-4x32 grouping transposes its mask through
    shared memory; the forward's code has the same shared-memory traffic either way."""
    rows, stderr = compiled_for_hopper(
        "import json, re; from sumtune.fast_t5 import flash_compile as fc\n"
        "off, on = {'PAIRS': False}, {'PAIRS': True}\n"
        "for name, config, flags in (('dkdv', (32, 64, 4, 3), off), ('dkdv', (32, 64, 4, 3), on),\n"
        "        ('dkdv', (32, 64, 4, 3), {'DROPOUT': False}), ('fwd', (64, 64, 4, 2), off),\n"
        "        ('fwd', (64, 64, 4, 2), on)):\n"
        "    ptx = fc.compile_kernel(name, *config, STORE_DS=name == 'dkdv', **flags).asm['ptx']\n"
        "    print(json.dumps([len(re.findall(p, ptx)) for p in (r'\\bld\\.shared', r'\\bst\\.shared',"
        " r'\\bbar\\.sync|\\bbarrier\\.sync', r'\\bshfl\\.')]))")
    assert len(rows) == 5, stderr
    quad, pairs, no_dropout, fwd_quad, fwd_pairs = rows
    assert pairs == no_dropout, (pairs, no_dropout)
    assert quad[0] > pairs[0] and quad[2] > pairs[2]  # the transpose the pairs remove (this test's reason)
    assert fwd_pairs == fwd_quad


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_wide_philox_products_take_one_multiply_a_round_in_the_hopper_build(compiled_for_hopper):
    """PHILOX_WIDE_MUL (the kernels' PAIRS 2): each Philox-2x32 round's product from one mul.wide.u32. Compiled for
    sm_90, the forward and dK/dV kernels (their 4096-token tiles) have fewer integer multiplies and instructions
    than with Triton's mul.lo + mul.hi (PAIRS 1) and at most a few more bytes of spill; the forward and the dK/dV
    kernel's masked loops no more registers (its lean build, LEAN_BACKWARD's, may take up to the cap: 255 against 249
    with Triton 3.6, no spill either way)."""
    rows, stderr = compiled_for_hopper(
        "import json; from sumtune.fast_t5 import flash_compile as fc\n"
        "for name, config, lean in (('fwd', (64, 64, 4, 2), True), ('dkdv', (32, 128, 8, 3), False),\n"
        "                           ('dkdv', (32, 128, 8, 3), True)):\n"
        "    for pairs in (1, 2):\n"
        "        c = fc.compile_kernel(name, *config, PAIRS=pairs, STORE_DS=name == 'dkdv', LEAN_TILES=lean)\n"
        "        s = fc.sass_opcodes(c)\n"
        "        print(json.dumps(dict(fc.resources(c), imad=s['IMAD'], total=sum(s.values()))))")
    assert len(rows) == 6, stderr
    for index, (two_muls, wide) in enumerate((rows[:2], rows[2:4], rows[4:])):
        # Triton 3.6: -163 / -94 multiplies (forward / dK-dV); 3.9, whose ptxas fuses some pairs itself: -113 / -32
        # (results/attention_compile_widemul-2026-12-03-cpu-sm90.json)
        assert wide["imad"] < two_muls["imad"] and wide["total"] < two_muls["total"], (two_muls, wide)
        # ptxas allots the registers anew: the forward spills 20 bytes instead of 12 (16 and 16 with PV_SPLIT)
        assert wide["spill_bytes"] <= two_muls["spill_bytes"] + 16, (two_muls, wide)
        assert index == 2 or wide["registers"] <= two_muls["registers"], (two_muls, wide)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_sass_opcode_counts_show_what_dropout_adds_to_the_forward(compiled_for_hopper):
    """flash_compile.sass_opcodes (nvdisasm on the sm_90 cubin): the forward with dropout has the same tensor-core
    GEMMs as without it, its exponentials, and more integer multiplies (the Philox rounds)."""
    rows, stderr = compiled_for_hopper(
        "import json; from sumtune.fast_t5 import flash_compile as fc\n"
        "for dropout in (False, True):\n"
        "    print(json.dumps(fc.sass_opcodes(fc.compile_kernel('fwd', 64, 64, 4, 2, DROPOUT=dropout))))")
    assert len(rows) == 2, stderr
    without, with_dropout = rows
    assert without["HGMMA"] == with_dropout["HGMMA"] > 0 and min(without["MUFU"], with_dropout["MUFU"]) >= 32
    assert with_dropout["IMAD"] > without["IMAD"] + 100, (without, with_dropout)
