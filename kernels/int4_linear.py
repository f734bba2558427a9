"""W4A16: y = x @ W.T + bias with 4-bit weights, group scales and optional zero points
(``Int4Weight``: W = (code - zero) * scale, symmetric means zero = 8).

Operands (N = out features, K = in features, Kp = K padded to the group, G = Kp / g)::

    x        [M, K]          float32 / float16 / bfloat16, any strides
    qweight  uint8 [N, Kp/2] canonical (layout: sparseinfer/formats/int4.py): low nibble = even k
    scale_t  float32 [G, N]  scales transposed (prepack), one group's row-tile contiguous
    zero_t   uint8 [G, N]    zero points transposed, or None for symmetric (zero = 8)

No nibble shuffling: a byte holds columns 2j (low) and 2j+1 (high), so the kernels split the
activations into their even and odd columns instead (x is small and cached) and never
interleave the weights -- the GEMV multiplies x_even by the low nibbles and x_odd by the high
ones, the dot kernel runs two half-depth ``tl.dot``s. Groups have even length (``Int4Weight``
pads per-channel rows to whole bytes), so both nibbles of a byte share scale and zero.

Kernels as in ``int8_linear``: ``gemv`` for M <= GEMV_MAX_M (fp32 FMAs, 3-D accumulator,
split-K), ``dot`` otherwise (tensor cores, codes minus zero -- integers in [-15, 15], exact in
fp16/bf16 -- into the dot, the scale on the partial product when a K tile is inside a group).
"""

from __future__ import annotations

import torch

from ._common import (check_tensor, check_x, dot_dtype, grid_for, jit, launch_options, require_triton, run_linear,
                      store_result, swizzle, tl)
from .int8_linear import configs as _int8_configs

GEMV_MAX_M = 8


def configs(variant: str, m: int, n: int, k: int, g: int) -> list[dict]:
    """Candidates: the int8 lists (same tiling), with K tiles of at least 32 columns so that each
    half-depth dot is >= 16 deep (BLOCK_K counts unpacked columns)."""
    return _int8_configs(variant, m, n, k, g, gemv_k_min=32, dot_k_min=32)


@jit
def int4_w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,  # z_ptr: zero points [G, N] (unused if symmetric)
    M, N, K, K_PER_SPLIT, KB,                            # KB: bytes per qweight row (Kp / 2)
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2  # bytes per row per K tile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, HALF), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ke = k0 + 2 * rj  # the even column of each byte
        e_ok = ke < k_end
        o_ok = ke + 1 < k_end
        # Byte j of the tile holds columns ke[j], ke[j]+1. Its mask only keeps the load inside the row
        # (the activations are masked to this split's K range): with KB a multiple of 16 the loads
        # vectorize, which a mask computed from ke (a // 2 away) would prevent.
        kb = k0 // 2 + rj
        b = tl.load(q_ptr + rn[:, None] * stride_qn + kb[None, :] * stride_qk, mask=n_ok[:, None] & (kb < KB)[None, :],
                    other=0, eviction_policy="evict_first").to(tl.int32)
        if TILE_IN_GROUP:
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + rn * stride_sn, mask=n_ok, other=0.0)[:, None]
            if HAS_ZERO:
                z = tl.load(z_ptr + (k0 // GROUP) * stride_zg + rn * stride_zn, mask=n_ok, other=0)
                z = z.to(tl.int32)[:, None]
            else:
                z = 8
        else:
            g_off = (ke // GROUP)[None, :]
            gmask = n_ok[:, None] & e_ok[None, :]
            s = tl.load(s_ptr + g_off * stride_sg + rn[:, None] * stride_sn, mask=gmask, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g_off * stride_zg + rn[:, None] * stride_zn, mask=gmask, other=0).to(tl.int32)
            else:
                z = 8
        w_lo = ((b & 0xF) - z).to(tl.float32) * s
        w_hi = ((b >> 4) - z).to(tl.float32) * s
        x_row = x_ptr + rm[:, None] * stride_xm
        x_e = tl.load(x_row + ke[None, :] * stride_xk, mask=m_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        x_o = tl.load(x_row + (ke + 1)[None, :] * stride_xk, mask=m_ok[:, None] & o_ok[None, :],
                      other=0.0).to(tl.float32)
        acc += x_e[:, None, :] * w_lo[None, :, :] + x_o[:, None, :] * w_hi[None, :, :]
    store_result(tl.sum(acc, axis=2), rm, rn, pid_k, b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@jit
def int4_w4a16_dot_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, K_PER_SPLIT, KB,                            # KB: bytes per qweight row (Kp / 2)
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ke = k0 + 2 * rj
        e_ok = ke < k_end
        o_ok = ke + 1 < k_end
        x_row = x_ptr + rm[:, None] * stride_xm
        x_e = tl.load(x_row + ke[None, :] * stride_xk, mask=m_ok[:, None] & e_ok[None, :], other=0.0).to(DOT_DTYPE)
        x_o = tl.load(x_row + (ke + 1)[None, :] * stride_xk, mask=m_ok[:, None] & o_ok[None, :],
                      other=0.0).to(DOT_DTYPE)
        # Bytes read transposed, [HALF, BLOCK_N]: row j holds columns k0+2j (low) and k0+2j+1 (high).
        kb = k0 // 2 + rj
        b = tl.load(q_ptr + rn[None, :] * stride_qn + kb[:, None] * stride_qk, mask=(kb < KB)[:, None] & n_ok[None, :],
                    other=0).to(tl.int32)
        if TILE_IN_GROUP:
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + rn * stride_sn, mask=n_ok, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + (k0 // GROUP) * stride_zg + rn * stride_zn, mask=n_ok, other=0)
                z = z.to(tl.int32)[None, :]
            else:
                z = 8
            part = tl.dot(x_e, ((b & 0xF) - z).to(DOT_DTYPE), input_precision="ieee")
            part = tl.dot(x_o, ((b >> 4) - z).to(DOT_DTYPE), part, input_precision="ieee")
            acc += part * s[None, :]
        else:
            g_off = (ke // GROUP)[:, None]
            gmask = e_ok[:, None] & n_ok[None, :]
            s = tl.load(s_ptr + g_off * stride_sg + rn[None, :] * stride_sn, mask=gmask, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g_off * stride_zg + rn[None, :] * stride_zn, mask=gmask, other=0).to(tl.int32)
            else:
                z = 8
            acc = tl.dot(x_e, (((b & 0xF) - z).to(tl.float32) * s).to(DOT_DTYPE), acc, input_precision="ieee")
            acc = tl.dot(x_o, (((b >> 4) - z).to(tl.float32) * s).to(DOT_DTYPE), acc, input_precision="ieee")
    store_result(acc, rm, rn, pid_k, b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn, HAS_BIAS, SPLIT_K)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, variant: str | None = None,
                config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ ((code - zero) * scale).T + bias, in x.dtype.

    x: float32/float16/bfloat16 [M, K], any strides. qweight: uint8 [N, Kp/2] (low nibble =
    even column), Kp >= K a multiple of the (even) group length. scale_t: float32 [G, N];
    zero_t: uint8 [G, N] or None (symmetric, zero = 8), any strides. bias: [N] or None. out,
    variant, config: as in ``int8_linear``.
    """
    require_triton("int4_linear")
    name = "int4_linear"
    m, k = check_x(x, name)
    check_tensor(qweight, "qweight", torch.uint8, None, x.device, name)
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    groups = scale_t.shape[0] if isinstance(scale_t, torch.Tensor) and scale_t.dim() == 2 else 0
    if kp < k or groups == 0 or kp % groups or (kp // groups) % 2:
        raise ValueError(f"{name}: qweight {tuple(qweight.shape)} and scale_t {tuple(getattr(scale_t, 'shape', ()))} "
                         f"do not describe a [N, Kp >= K={k}] weight in whole groups of even length "
                         f"(x {tuple(x.shape)})")
    check_tensor(scale_t, "scale_t", torch.float32, (groups, n), x.device, name)
    if zero_t is not None:
        check_tensor(zero_t, "zero_t", torch.uint8, (groups, n), x.device, name)
    g = kp // groups

    def launch(cfg, variant, y, ws, k_per_split):
        z = zero_t if zero_t is not None else scale_t  # a placeholder pointer when symmetric
        args = (x, qweight, scale_t, z, bias if bias is not None else y, y, ws, m, n, k, k_per_split, kp // 2,
                x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scale_t.stride(0), scale_t.stride(1),
                z.stride(0), z.stride(1), y.stride(0), y.stride(1))
        consts = dict(GROUP=g, TILE_IN_GROUP=g % cfg["BLOCK_K"] == 0, HAS_ZERO=zero_t is not None,
                      HAS_BIAS=bias is not None)
        if variant == "dot":
            consts["DOT_DTYPE"] = dot_dtype(x.dtype)
        kernel = int4_w4a16_gemv_kernel if variant == "gemv" else int4_w4a16_dot_kernel
        kernel[grid_for(variant, cfg, m, n)](*args, **consts, **launch_options(cfg))

    return run_linear(name, x, n, bias, out, variant, config, lambda v, mm: configs(v, mm, n, k, g),
                      (g, zero_t is not None), launch, GEMV_MAX_M)
