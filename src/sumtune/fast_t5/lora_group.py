"""Several LoRA layers over 4-bit linears that read one input (T5's q/k/v; cross-attention's k/v) as one node.

Each layer alone (:mod:`sumtune.fast_t5.lora4bit` with ``concat_gemms``) reads the shared input for its own low-rank
GEMM, concatenates its own copy of ``[x | s·xAᵀ]``, and autograd sums the layers' input gradients afterwards. As a
group (ranks r_i, R = Σ r_i, column offsets o_i of each layer's r_i columns among the R):

    forward:  low = x [A_1; …; A_g]ᵀ (one GEMM),  xc = [x | s_i·low_i …] (one copy),  y_i = xc J_iᵀ
              with J_i = [W_i | B_i in columns o_i … o_i + r_i of R, zeros elsewhere]
    backward: acc = Σ_i dy_i J_i (addmm into one buffer): acc[:, :in] = Σ dy_i W_i, acc[:, in:] = [dy_i B_i …]
              dx = acc[:, :in] + (s·acc[:, in:]) [A_1; …; A_g],  d[A_1; …] = (s·acc[:, in:])ᵀ x,  dB_i = s_i dy_iᵀ low_i

The zero columns add R - r_i to each layer's K (T5-3b's q: 1072 instead of 1040, +3% of its FLOPs). Only for
layers the single node would run on its wide-output route (no LoRA dropout, output >= 2x input); any other case
returns None and the caller runs the layers one by one. On by default (``GROUP_PROJECTIONS``; benchmark token
``noqkvgroup`` turns it off): on an H200 the shipped config ran 43.3 vs 42.5 samples/s and the long one 6.06 vs 6.00
(results/train_throughput_shipped_tiles_group-*, long_documents_group-*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sumtune.fast_t5 import lora4bit

GROUP_PROJECTIONS = True


class FusedLoraGroup4bit(torch.autograd.Function):
    """Outputs y_i = base_i(x) + s_i · B_i(A_i(x)) of g layers over one input, as one autograd node."""

    @staticmethod
    def forward(ctx, x, bases, scalings, dtype, *weights):
        with torch.autocast(x.device.type, enabled=False):
            x2d = x.reshape(-1, x.shape[-1]).to(dtype)
            a_ws, b_ws = [w.to(dtype) for w in weights[0::2]], [w.to(dtype) for w in weights[1::2]]
            ranks = [a.shape[0] for a in a_ws]
            a_cat = torch.cat(a_ws)  # [R, in]
            low = x2d @ a_cat.t()  # [N, R]
            scale = torch.cat([torch.full((r,), s, dtype=dtype, device=x.device) for r, s in zip(ranks, scalings)])
            xc = torch.cat([x2d, low * scale], dim=1)
            outs = [F.linear(xc, _group_weight(base, b, ranks, i, dtype), None if base.bias is None else
                             base.bias.to(dtype)) for i, (base, b) in enumerate(zip(bases, b_ws))]
        ctx.save_for_backward(x2d, low, a_cat, scale, *b_ws)
        ctx.bases, ctx.scalings, ctx.ranks, ctx.dtype = bases, scalings, ranks, dtype
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = x.shape, x.dtype, [w.dtype for w in weights]
        return tuple(out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype) for out in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x2d, low, a_cat, scale, *b_ws = ctx.saved_tensors
        in_features = x2d.shape[1]
        offsets = [sum(ctx.ranks[:i]) for i in range(len(ctx.ranks))]
        with torch.autocast(x2d.device.type, enabled=False):
            # autograd hands an output that reached no loss a zero gradient (materialized), never None
            grads2d = [g.reshape(-1, g.shape[-1]).to(ctx.dtype) for g in grad_outs]
            acc = grads2d[0] @ _group_weight(ctx.bases[0], b_ws[0], ctx.ranks, 0, ctx.dtype)
            for i in range(1, len(grads2d)):
                acc.addmm_(grads2d[i], _group_weight(ctx.bases[i], b_ws[i], ctx.ranks, i, ctx.dtype))
            grad_low = acc[:, in_features:] * scale  # [N, R]: dL/d(x Aᵀ) of every layer
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.addmm(acc[:, :in_features], grad_low, a_cat).reshape(ctx.x_shape).to(ctx.x_dtype)
            grad_a = grad_low.t() @ x2d  # [R, in]
            weight_grads = []
            for i, (offset, rank) in enumerate(zip(offsets, ctx.ranks)):
                grad_b = (grads2d[i].t() @ low[:, offset:offset + rank]).mul_(ctx.scalings[i])
                weight_grads += [grad_a[offset:offset + rank].to(ctx.param_dtypes[2 * i]),
                                 grad_b.to(ctx.param_dtypes[2 * i + 1])]
        return (grad_x, None, None, None, *weight_grads)


def _group_weight(base: torch.nn.Module, b_w: torch.Tensor, ranks: list[int], index: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """J_i = [W_i | B_i at its group columns, zeros elsewhere] (module docstring), via lora4bit's joined buffer."""
    before, after = sum(ranks[:index]), sum(ranks[index + 1:])
    return lora4bit._joined_weight(base, "out", b_w, dtype, pad_before=before, pad_after=after)


def grouped_projections(layers, x: torch.Tensor):
    """The layers' outputs on ``x`` from one :class:`FusedLoraGroup4bit` node, or None where the group does not
    apply (``GROUP_PROJECTIONS`` off, a layer PEFT or the single fused node must run, mixed dtypes)."""
    if not GROUP_PROJECTIONS:
        return None
    names, bases = [], []
    for layer in layers:
        if not getattr(layer, lora4bit._FUSED_ATTR, False) or not getattr(layer, lora4bit._CONCAT_ATTR, False):
            return None
        name = lora4bit._fusable_adapter(layer, x, (), {})
        if name is None or lora4bit.lora_dropout_p(layer, name) > 0:
            return None
        base = layer.get_base_layer()
        if lora4bit.wide_side(base.in_features, base.out_features) != "out":
            return None
        names.append(name)
        bases.append(base)
    if len({base.compute_dtype for base in bases}) != 1:
        return None
    weights = []
    for layer, name in zip(layers, names):
        weights += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return _apply(x, bases, [float(layer.scaling[name]) for layer, name in zip(layers, names)],
                  bases[0].compute_dtype, weights)


@torch.compiler.disable  # as lora4bit's single node: eager between compiled regions
def _apply(x, bases, scalings, dtype, weights):
    return FusedLoraGroup4bit.apply(x, bases, scalings, dtype, *weights)
