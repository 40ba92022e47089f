"""A decode step's attention as one Triton kernel that reads only the cache positions a row
attends to (imported only where Triton is installed; `decode_attention` decides when).

A static key/value cache of a left-padded batch holds, for each row, its padding before the
prompt and the slots of tokens not generated yet after it: in the preset's 300 x 128
generation of LLaMA-2-7B about half of the 229 positions. torch's kernels for a masked
attention read every position and then discard the masked ones; this one loads a key or value
only where the mask keeps it (a masked load issues no memory access), with an online softmax
in fp32 over blocks of positions in a fixed order, so its answers do not change from run to
run. One program per (row, query head); grouped-query heads read their shared key/value head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64  # positions a program reads at a time


# The cache's length and the mask's strides that follow it are not specialised on: they change
# batch by batch, and one compiled kernel serves every length
NOT_SPECIALISED = ("positions", "stride_mb", "stride_mh")


@triton.jit(do_not_specialize=list(NOT_SPECIALISED))
def _masked_decode(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_ob,
    stride_oh,
    positions,
    group,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row x stride passes 2**31 in a large cache
    head = tl.program_id(1).to(tl.int64)
    kv_head = head // group
    dims = tl.arange(0, HEAD_DIM)
    query = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims).to(tl.float32) * scale
    keys = k_ptr + row * stride_kb + kv_head * stride_kh
    values = v_ptr + row * stride_vb + kv_head * stride_vh
    # running maximum and sum of the softmax, as vectors of one (loop-carried)
    best = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(0, positions, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        keep = offsets < positions
        if HAS_MASK:
            masked = mask_ptr + row * stride_mb + head * stride_mh + offsets * stride_ms
            keep = keep & (tl.load(masked, mask=keep, other=0) != 0)
        # a masked lane is not read; `other` gives it a value (undefined without it, and NaN
        # there would survive the zero weight below: 0 x NaN)
        key = tl.load(
            keys + offsets[:, None] * stride_ks + dims[None, :], mask=keep[:, None], other=0.0
        )
        scores = tl.sum(key.to(tl.float32) * query[None, :], axis=1)
        scores = tl.where(keep, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        # before any kept position the maximum is -inf: shift by 0 so that exp stays defined
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - shift)
        rescale = tl.exp(best - shift)
        value = tl.load(
            values + offsets[:, None] * stride_vs + dims[None, :], mask=keep[:, None], other=0.0
        )
        acc = acc * rescale + tl.sum(weights[:, None] * value.to(tl.float32), axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        best = new_best
    out = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def masked_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one query position: query (rows, heads, 1, dim),
    key and value (rows, kv_heads, positions, dim), mask None or boolean, broadcastable to
    (rows, heads, 1, positions), True where attended. Returns (rows, heads, 1, dim); a row
    that attends to nothing gets zeros."""
    rows, heads, _, dim = query.shape
    positions = key.shape[2]
    out = torch.empty_like(query)
    has_mask = mask is not None
    if not has_mask:
        mask_strides, mask = (0, 0, 0), key  # a pointer the kernel never reads
    else:
        # bytes, as Triton reads them (torch's bool is one byte)
        mask = mask.expand(rows, heads, 1, positions).view(torch.uint8)
        mask_strides = (mask.stride(0), mask.stride(1), mask.stride(3))
    _masked_decode[(rows, heads)](
        query,
        key,
        value,
        mask,
        out,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        *mask_strides,
        out.stride(0),
        out.stride(1),
        positions,
        heads // key.shape[1],
        scale,
        HEAD_DIM=dim,
        BLOCK=BLOCK,
        HAS_MASK=has_mask,
        num_warps=4,
    )
    return out


def warm_up(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the kernels that a generation's decode steps launch, or read them from Triton's
    disk cache, for `device`: one row over one block of positions, with what Triton
    specialises on as in a generation (the dtype, the head size, heads per key/value head, a
    boolean mask read position by position, every other stride a multiple of 16 where the
    head size is). Two kernels: with a mask (a left-padded batch, the usual case) and without
    (a batch of prompts of one length gets none)."""
    query = torch.zeros(1, heads, 1, dim, dtype=dtype, device=device)
    key = torch.zeros(1, kv_heads, BLOCK, dim, dtype=dtype, device=device)
    for mask in (torch.ones(1, 1, 1, BLOCK, dtype=torch.bool, device=device), None):
        masked_decode(query, key, key, mask, dim**-0.5)
