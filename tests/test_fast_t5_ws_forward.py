"""sumtune.fast_t5.ws_forward: the no-gradient attention forward, warp-specialized (flash_attention.WS_NO_GRAD_FORWARD).

On CPU: it compiles for sm_90 (a process without Triton's interpreter) within Hopper's shared memory, as a producer
warp with few registers and two consumer warpgroups with many, loading by TMA only, waiting in its loop with an MMA
still in flight; it takes only the layouts its descriptors can read; a launch that raises hands the call to the
Triton forward once and for good. On a Hopper GPU (``-m gpu``): its outputs match float64 and the Triton forward,
with T5's bias (near and far tiles), padding with a hole, a row without keys, cross-attention lengths, lengths that
are not whole tiles and the fused projection's strided layout.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

WS_FORWARD_FOR_HOPPER = r"""
import json, re
from sumtune.fast_t5.flash_compile import resources, _sass
from sumtune.fast_t5 import ws_forward
for settings in ({}, {"stages": 3}, {"HAS_BIAS": False, "HAS_KEY_MASK": False}, {"LEAN_FAR": True},
                 {"head_dim": 64, "stages": 3}, {"head_dim": 64, "LEAN_FAR": True}, {"DROPOUT": True}):
    compiled = ws_forward.compile_for_sm90(**settings)
    ptx, sass = compiled.asm["ptx"], _sass(compiled)
    print(json.dumps(dict(settings=settings, waits=[int(w) for w in re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)",
                                                                                 ptx)],
                          bulk=ptx.count("cp.async.bulk.tensor"), setmaxnreg=re.findall(r"setmaxnreg\.(\w+)\.sync"
                                                                                       r"\.aligned\.u32\s+(\d+)", ptx),
                          hgmma=sass.count("HGMMA"), arrives=ptx.count("mbarrier.arrive.shared"),
                          **resources(compiled))))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_ws_forward_builds_for_hopper_as_a_producer_warp_and_two_consumer_warpgroups(compiled_for_hopper):
    """Both ring sizes, the build without bias or mask, the ones with LEAN_FAR_TILES, with head_dim 64 (also with
    LEAN_FAR_TILES, as ws64 would run by default) and with dropout compile for sm_90 within Hopper's shared memory
    with little spill; loads by TMA only; the producer's registers are cut to 24 and the consumers' raised to 240
    (FlashAttention-3's split); both consumers' warpgroup MMAs are there, and the loop waits with an MMA still in
    flight (the next scores beside this tile's P·V). That the dropout build compiles at all shows its keep mask
    reaching the accumulator's layout without data movement (`_keep_pairs` asserts the conversion trivial)."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5.flash_compile import HOPPER_SHARED_BYTES

    rows, stderr = compiled_for_hopper(WS_FORWARD_FOR_HOPPER)
    assert len(rows) == 7, stderr
    for row in rows:
        # dropout's draws (16 Philox calls a thread and tile) spill a little beside the bias: measured before kept
        assert row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
        assert row["spill_bytes"] <= (256 if row["settings"].get("DROPOUT") else 32), row
        assert row["async_copies"] == 0 and row["bulk"] > 0, row  # TMA only
        assert ["dec", "24"] in row["setmaxnreg"] and ["inc", "240"] in row["setmaxnreg"], row
        # two consumers, each: the first S and the loop's next S (head_dim / 16 MMAs each), P·V (128 keys / 16)
        head_dim = row["settings"].get("head_dim", 128)
        assert row["hgmma"] == 2 * (2 * head_dim // 16 + 128 // 16), row
        assert 1 in row["waits"], row  # an MMA group left in flight at a wait
        # each consumer signals the producer after its first scores and, in the loop, for the K and the V slot (each
        # arrive is a warpgroup barrier in Triton's lowering; freeing both slots with one arrive measured slower)
        assert row["arrives"] == 6, row


def test_the_ws_forward_takes_only_what_its_descriptors_can_read():
    """[B, L, H, D] projections seen as (B, H, L, D), fused or not, are rows of a 2-D TMA descriptor; a contiguous
    (B, H, L, D) tensor or an odd row stride is not; off CUDA nothing is covered."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5 import ws_forward

    rows = ws_forward.rows_stride
    separate = torch.zeros(2, 48, 4, 128, dtype=torch.bfloat16).transpose(1, 2)
    fused = torch.zeros(2, 48, 3, 4, 128, dtype=torch.bfloat16)[:, :, 1].transpose(1, 2)
    assert rows(separate) == 4 * 128 and rows(fused) == 3 * 4 * 128
    assert rows(torch.zeros(2, 4, 48, 128, dtype=torch.bfloat16)) is None  # heads outermost: not rows of B * L
    assert rows(torch.zeros(2, 48, 4, 129, dtype=torch.bfloat16)[..., :128].transpose(1, 2)) is None  # 258-byte rows
    assert not ws_forward.covers(separate, separate, separate, causal=False)  # a CPU tensor


def test_a_ws_forward_that_fails_to_launch_hands_over_to_the_triton_forward_once(monkeypatch):
    """If the launch raises (a Triton release whose Gluon API moved), one warning names the error, the Triton forward
    computes that call and every later one, and the kernel is not tried again; a forward a gradient reaches never
    asks for it."""
    pytest.importorskip("triton.experimental.gluon")
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import flash_kernels, ws_forward

    if not flash_kernels.INTERPRET:
        pytest.skip("a CUDA machine: the GPU test below runs the kernel itself")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 32, generator=gen).transpose(1, 2) for _ in range(3))
    table = torch.randn(2, 79, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    tries = []

    def broken(*args):
        tries.append(args)
        raise TypeError("async_copy_global_to_shared() got an unexpected keyword argument 'pred'")

    monkeypatch.setattr(fa, "WS_NO_GRAD_FORWARD", True)
    monkeypatch.setattr(fa, "_ws_asked", lambda *call: True)
    monkeypatch.setattr(ws_forward, "failure", None)
    monkeypatch.setattr(ws_forward, "covers", lambda *args: True)
    monkeypatch.setattr(ws_forward, "forward", broken)
    with fa.block_sizes(fwd=(16, 16)):
        with torch.no_grad():
            monkeypatch.setattr(fa, "WS_NO_GRAD_FORWARD", False)
            expected = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8)
            monkeypatch.setattr(fa, "WS_NO_GRAD_FORWARD", True)
            with pytest.warns(RuntimeWarning, match="warp-specialized attention forward cannot run here .TypeError"):
                got = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8)
            assert torch.equal(got, expected) and len(tries) == 1
            assert ws_forward.failure.startswith("TypeError: async_copy_global_to_shared()")
            assert torch.equal(fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8), expected)
            assert len(tries) == 1
        monkeypatch.setattr(ws_forward, "failure", None)
        fa.flash_t5_attention(q.requires_grad_(), k, v, table, mask, bias_radius=8)
        assert len(tries) == 1
        # a training build (dropout) that raises turns off the training route only: the no-gradient one still tries
        monkeypatch.setattr(fa, "WS_TRAINING_FORWARD", True)
        monkeypatch.setattr(ws_forward, "training_failure", None)
        with pytest.warns(RuntimeWarning, match="attention forward with dropout cannot run here"):
            fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8, dropout_p=0.1)
        assert len(tries) == 2 and ws_forward.training_failure and ws_forward.failure is None
        fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8, dropout_p=0.1)
        assert len(tries) == 2
        with torch.no_grad(), pytest.warns(RuntimeWarning):
            fa.flash_t5_attention(q, k, v, table, mask, bias_radius=8)
        assert len(tries) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("stages, lean, head_dim",
                         [(2, False, 128), (3, False, 128), (2, True, 128), (3, False, 64), (2, True, 64)],
                         ids=["ring2", "ring3", "lean", "d64", "d64lean"])
def test_gpu_ws_forward_matches_float64_and_the_triton_forward(monkeypatch, stages, lean, head_dim):
    """WS_NO_GRAD_FORWARD on a Hopper GPU, bf16, no gradient: as close to float64 as the Triton forward, at lengths
    that are not whole tiles, T5's bias with radii that give far and near tiles, rows padded at the end, with a hole,
    and without keys, cross-attention lengths, no bias (WITHOUT_BIAS_HEAD_DIMS), the fused projection's strided
    layout; with rings of two and three, with LEAN_FAR_TILES, and head_dim 64; its kernel is what ran."""
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import ws_forward

    monkeypatch.setattr(ws_forward, "STAGES", stages)
    monkeypatch.setattr(ws_forward, "LEAN_FAR_TILES", lean)
    monkeypatch.setattr(ws_forward, "HEAD_DIMS", (head_dim,))
    monkeypatch.setattr(ws_forward, "WITHOUT_BIAS_HEAD_DIMS", (head_dim,))
    launched = []
    launch = ws_forward.forward
    monkeypatch.setattr(ws_forward, "forward", lambda *a, **k: launched.append(a[0].shape) or launch(*a, **k))
    gen = torch.Generator(device="cuda").manual_seed(3)
    heads, batch = 4, 4
    cases = 0
    for query_len, key_len, fused in ((700, 700, False), (700, 700, True), (300, 1000, False), (64, 64, False),
                                      (1024, 1024, False)):
        if fused:  # q, k, v slices of one [B, L, 3, H, D] projection, as a fused QKV GEMM gives them
            qkv = torch.randn(batch, key_len, 3, heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            q = torch.randn(batch, query_len, heads, head_dim, device="cuda", generator=gen,
                            dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(batch, key_len, heads, head_dim, device="cuda", generator=gen,
                                dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        q = q / 4  # scores of a few units, as T5's are
        mask = torch.ones(batch, key_len, dtype=torch.bool, device="cuda")
        mask[1, key_len * 2 // 3:] = False  # right padding
        mask[2, key_len // 3:] = False
        mask[2, 5] = False  # a hole: the mask is read in this row
        mask[3] = False  # no keys at all: zeros
        for radius, with_mask in ((128, True), (8, True), (128, False), (0, True)):
            # T5's table: one value for every offset at or beyond +-radius; radius 0: no bias (cross-attention)
            offsets = torch.arange(1 - query_len, key_len, device="cuda").clamp(-radius, radius) + radius
            table = (torch.randn(heads, 2 * radius + 1, device="cuda", generator=gen) * 2)[:, offsets] if radius \
                else None
            rows = slice(0, 3) if with_mask else slice(None)
            expected = fa.reference_t5_attention(q, k, v, table, mask if with_mask else None)
            with torch.no_grad():
                monkeypatch.setattr(fa, "WS_NO_GRAD_FORWARD", False)
                triton_out = fa.flash_t5_attention(q, k, v, table, mask if with_mask else None, bias_radius=radius)
                monkeypatch.setattr(fa, "WS_NO_GRAD_FORWARD", True)
                before = len(launched)
                got = fa.flash_t5_attention(q, k, v, table, mask if with_mask else None, bias_radius=radius)
            case = (query_len, key_len, fused, radius, with_mask, stages, lean, head_dim)
            assert len(launched) == before + 1, case  # its own launch
            ws_error = relative_error(got[rows], expected[rows])
            triton_error = relative_error(triton_out[rows], expected[rows])
            assert ws_error < max(1.5 * triton_error, 1e-3), (*case, ws_error, triton_error)
            assert torch.isfinite(got).all(), case
            if with_mask:
                assert not got[3].any(), case
            cases += 1
    assert ws_forward.failure is None and cases == 20


def relative_error(value, reference) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
def test_gpu_ws_training_forward_drops_what_the_triton_kernels_drop(monkeypatch, t5_attention_case):
    """WS_TRAINING_FORWARD: a forward a gradient reaches, with T5's bias, padding and dropout 0.1, runs the
    warp-specialized kernel; under the same seed its output and the gradients (the Triton backward regenerating the
    mask) match the Triton forward's to bf16 rounding, while another seed's do not: the same elements were dropped."""
    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import ws_forward

    launched = []
    launch = ws_forward.forward
    monkeypatch.setattr(ws_forward, "forward", lambda *a, **k: launched.append(a[0].shape) or launch(*a, **k))
    q, k, v, mask, table, radius, grad_out = t5_attention_case(5)

    def run(ws: bool, seed: int):
        monkeypatch.setattr(fa, "WS_TRAINING_FORWARD", ws)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(seed)
        out = fa.flash_t5_attention(*leaves, table, mask, bias_radius=radius, dropout_p=0.1)
        out.backward(grad_out)
        return [out.detach()] + [x.grad for x in leaves]

    before = len(launched)
    triton_run = run(False, 11)
    assert len(launched) == before
    ws_run = run(True, 11)
    assert len(launched) == before + 1  # the training forward ran in the warp-specialized kernel
    other_seed = run(False, 12)
    for name, got, expected, unrelated in zip(("out", "dq", "dk", "dv"), ws_run, triton_run, other_seed):
        error, apart = relative_error(got, expected), relative_error(unrelated, expected)
        assert error < 2e-2 and apart > 10 * error, (name, error, apart)
    assert ws_forward.failure is None and ws_forward.training_failure is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("radius", [8, 128])
def test_gpu_ws_training_forward_keeps_exactly_the_elements_the_mask_keeps(monkeypatch, radius):
    """Every decision, not a tolerance: with zero queries and keys and a zero bias each row's probabilities are 1/n
    over its n keys, and V[j] = e_(j % 128), so output column c times n / dropout_scale counts the kept keys j = c
    (mod 128): 0..8, distinct in bf16. 300 queries (a partial tile in the second warpgroup) against 1000 keys (a
    partial key tile; Lq != Lk sets the draws' columns), a padded row, near and far tiles mixed (radius 8)."""
    import torch.nn.functional as F

    from sumtune.fast_t5 import flash_attention as fa
    from sumtune.fast_t5 import ws_forward

    batch, heads, query_len, key_len, head_dim, p = 2, 3, 300, 1000, 128, 0.1
    lengths = torch.tensor([key_len, 700], device="cuda")
    mask = torch.arange(key_len, device="cuda")[None, :] < lengths[:, None]
    q = torch.zeros(batch, query_len, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q.requires_grad_()
    k = torch.zeros(batch, key_len, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.eye(head_dim, device="cuda", dtype=torch.bfloat16)[torch.arange(key_len) % head_dim]
    v = v[None, :, None].expand(batch, key_len, heads, head_dim).contiguous().transpose(1, 2)
    table = torch.zeros(heads, query_len + key_len - 1, device="cuda")
    launched = []
    launch = ws_forward.forward
    monkeypatch.setattr(ws_forward, "forward", lambda *a, **kw: launched.append(1) or launch(*a, **kw))
    monkeypatch.setattr(fa, "WS_TRAINING_FORWARD", True)
    torch.manual_seed(7)
    out = fa.flash_t5_attention(q, k, v, table, mask, bias_radius=radius, dropout_p=p)
    assert launched and ws_forward.training_failure is None
    torch.manual_seed(7)
    keep = fa.dropout_keep_mask(fa.draw_seed("cuda"), batch, heads, query_len, key_len, p) & mask[:, None, None, :]
    kept = F.pad(keep.int(), (0, 1024 - key_len)).view(batch, heads, query_len, 8, head_dim).sum(3)
    counts = out.float() * lengths[:, None, None, None] / fa.dropout_scale(p)
    assert torch.equal(counts.round(), kept.float())
    assert (counts - kept).abs().max() < 0.1
