"""Where a FlashAttention-style kernel's bf16 roundings put its gradients, against stock's backends (CPU, float64).

    python benchmarks/attention_rounding.py                 # 1024 tokens, 4 heads, head_dim 128
    python benchmarks/attention_rounding.py --length 4096

One attention layer with T5-like inputs (bf16 q, k, v, bias and dO), emulated in PyTorch: the exact float64 result;
PyTorch's math SDPA (which upcasts bf16 to float32, as stock T5 with its bias runs); stock eager T5 (scores and
probabilities rounded to bf16); and the kernels' roundings (P to bf16 for P·V and dV, dS to bf16 for dQ and dK,
delta from the bf16 output), each also switched off alone to show its share. Relative error of O, dQ, dK, dV (after
rounding to bf16, as every path stores them). Writes benchmarks/results/attention_rounding-<date>-cpu.json.
"""

from __future__ import annotations

import argparse

import torch

import bench_common as bc

ROUNDINGS = ("p_forward", "p_in_dv", "ds", "delta_from_bf16_out")


def make_inputs(length: int, heads: int, head_dim: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16-representable inputs (held in float64) with scores of order one and a bias of order two."""
    gen = torch.Generator().manual_seed(seed)

    def bf16(t):
        return t.to(torch.bfloat16).double()

    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    table = torch.randn(heads, 2 * length - 1, generator=gen) * 2.0
    return dict(q=bf16(torch.randn(1, heads, length, head_dim, generator=gen) * 0.3),
                k=bf16(torch.randn(1, heads, length, head_dim, generator=gen) * 0.3),
                v=bf16(torch.randn(1, heads, length, head_dim, generator=gen)),
                grad_out=bf16(torch.randn(1, heads, length, head_dim, generator=gen) * 1e-3),
                bias=bf16(table[:, offsets + length - 1].unsqueeze(0)))


def exact(x: dict, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    """O, dQ, dK, dV computed in ``dtype`` throughout (float32: PyTorch's math SDPA on bf16 inputs)."""
    q, k, v, bias, g = (x[n].to(dtype) for n in ("q", "k", "v", "bias", "grad_out"))
    p = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
    dp = g @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return p @ v, ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ g


def eager(x: dict) -> tuple[torch.Tensor, ...]:
    """Stock T5's eager attention under bf16 autocast: bf16 scores, float32 softmax, bf16 probabilities and dP."""
    q, k, v, bias, g = (x[n].float() for n in ("q", "k", "v", "bias", "grad_out"))

    def r(t):
        return t.bfloat16().float()

    p = torch.softmax(r(r(q @ k.transpose(-1, -2)) + bias), -1)
    dp = r(g @ v.transpose(-1, -2))
    ds = r(p * (dp - (dp * p).sum(-1, keepdim=True)))
    return r(p) @ v, ds @ k, ds.transpose(-1, -2) @ q, r(p).transpose(-1, -2) @ g


def flash(x: dict, skip: str | None = None) -> tuple[torch.Tensor, ...]:
    """The kernels' float32 math with their bf16 roundings, ``skip`` one of ROUNDINGS left out."""
    q, k, v, bias, g = (x[n].float() for n in ("q", "k", "v", "bias", "grad_out"))

    def r(t, name):
        return t if name == skip else t.bfloat16().float()

    s = q @ k.transpose(-1, -2) + bias
    unnormalised = torch.exp(s - s.amax(-1, keepdim=True))
    denominator = unnormalised.sum(-1, keepdim=True)
    out = (r(unnormalised, "p_forward") @ v) / denominator
    p = unnormalised / denominator
    delta = (g * r(out, "delta_from_bf16_out")).sum(-1, keepdim=True)
    ds = r(p * (g @ v.transpose(-1, -2) - delta), "ds")
    return out, ds @ k, ds.transpose(-1, -2) @ q, r(p, "p_in_dv").transpose(-1, -2) @ g


def errors(outputs, reference) -> dict[str, float]:
    return {name: float((o.to(torch.bfloat16).double() - ref).norm() / ref.norm())
            for name, o, ref in zip(("out", "dq", "dk", "dv"), outputs, reference)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    x = make_inputs(args.length, args.heads)
    reference = exact(x)
    rows = {"stock_sdpa_math_fp32": errors(exact(x, torch.float32), reference),
            "stock_eager": errors(eager(x), reference), "flash": errors(flash(x), reference)}
    rows.update({f"flash_without_{name}_rounding": errors(flash(x, name), reference) for name in ROUNDINGS})
    for name, row in rows.items():
        print(f"{name:40s} " + "  ".join(f"{k} {v:.3e}" for k, v in row.items()))
    if not args.no_save:
        path = bc.save_result("attention_rounding", dict(length=args.length, heads=args.heads, head_dim=128,
                                                         relative_errors=rows), slug="cpu")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
