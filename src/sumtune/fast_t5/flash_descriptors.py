"""TMA descriptors for sumtune's attention kernels (``flash_attention.FWD_DESCRIPTORS`` and ``BWD_DESCRIPTORS``):
a (B, H, L, D) view whose elements sit as rows of a (B * L, H * D) matrix, as the projections write them, read as
tiles of rows by Hopper's tensor memory accelerator; the block shapes are set per launch by an autotune config's
pre_hook."""

from __future__ import annotations

from torch import Tensor


def rows_stride(x: Tensor) -> int | None:
    """The row stride s of a (B, H, L, D) view whose elements sit as rows of a (B * L, H * D) matrix s apart (the
    projections' layout, fused or not), if TMA can read it (16-byte aligned), else None."""
    batch, heads, length, head_dim = x.shape
    s = x.stride(2)
    aligned = (s * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
    return s if x.stride() == (length * s, head_dim, s, 1) and aligned else None


def row_descriptors(*tensors: Tensor):
    """TMA descriptors of (B, H, L, D) views as (B * L, H * D) rows (block shapes set per launch by key_blocks or
    query_blocks), or None where one's layout does not allow it."""
    strides = [rows_stride(x) for x in tensors]
    if None in strides:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(x, [x.shape[0] * x.shape[2], x.shape[1] * x.shape[3]], [stride, 1], [16, x.shape[3]])
                 for x, stride in zip(tensors, strides))


def key_blocks(args: dict) -> None:
    """The forward's K and V descriptors take its BLOCK_N keys x HEAD_DIM tiles (a config's pre_hook)."""
    for name in ("K", "V"):
        args[name].block_shape = [args["BLOCK_N"], args["HEAD_DIM"]]


def query_blocks(args: dict) -> None:
    """The dK/dV kernel's Q and dO descriptors take its BLOCK_M queries x HEAD_DIM tiles (a config's pre_hook)."""
    for name in ("Q", "DO"):
        args[name].block_shape = [args["BLOCK_M"], args["HEAD_DIM"]]
