"""W8A16: y = x @ W.T + bias with int8 weights and per-group float32 scales (``Int8Weight``).

Operands (N = out features, K = in features, Kp = K padded to the group, G = Kp / g)::

    x        [M, K]   float32 / float16 / bfloat16, any strides
    qweight  int8 [N, Kp]   canonical (sparseinfer/formats/int8.py; rows K-contiguous: coalesced for both)
    scale_t  float32 [G, N] the scales transposed (prepack does it once: one group's scales of
                             a tile of rows are then contiguous)

Two kernels:

* ``gemv`` (M <= GEMV_MAX_M, decoding): memory-bound, so no tensor cores; each program streams a
  [BLOCK_N, BLOCK_K] weight tile per step, dequantizes it in registers and multiplies it with
  the BLOCK_M activation rows in fp32, keeping a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator that is
  reduced once at the end. Split-K adds programs when N alone does not fill the GPU.
* ``dot`` (larger M): a tiled ``tl.dot`` GEMM with grouped tile order; when the K tile lies inside
  one quantization group the integer codes go straight into the dot (exact in fp16/bf16) and the
  scale multiplies the [BLOCK_M, BLOCK_N] partial product, instead of every weight.
"""

from __future__ import annotations

import torch

from ._common import (cdiv, check_x, check_tensor, dot_dtype, grid_for, jit, launch_options, next_pow2,
                      require_triton, run_linear, store_result, swizzle, tl)

GEMV_MAX_M = 8  # batch rows up to which the GEMV kernel runs (the dot kernel pads M to 16)

# -- configs as data --------------------------------------------------------------------------
# GEMV: BLOCK_M is the batch rounded up to a power of two; the 3-D accumulator holds
# BLOCK_M*BLOCK_N*BLOCK_K fp32 values, kept <= 8192 (64 registers a thread at 4 warps).
GEMV_CONFIGS = [
    dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=2),
    dict(BLOCK_N=8, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2),
    dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=2, num_warps=4, num_stages=2),
    dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=2),
    dict(BLOCK_N=8, BLOCK_K=256, SPLIT_K=1, num_warps=2, num_stages=3),
]
DOT_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3),
]


def fit_block_k(block_k: int, g: int, smallest: int) -> int:
    """Shrink BLOCK_K to a power-of-two group so that a K tile never straddles two groups (one
    scale per tile); per-channel groups (g = Kp, any K) need no shrinking."""
    if g & (g - 1) == 0 and smallest <= g < block_k:
        return g
    return block_k


def configs(variant: str, m: int, n: int, k: int, g: int, gemv_k_min: int = 16, dot_k_min: int = 32) -> list[dict]:
    """The candidate configs of a call, fitted to its shape (deduplicated, order kept: the first
    one is the untuned default)."""
    out = []
    if variant == "gemv":
        bm = next_pow2(m)
        for c in GEMV_CONFIGS:
            c = dict(c, BLOCK_M=bm, BLOCK_K=fit_block_k(c["BLOCK_K"], g, gemv_k_min))
            while bm * c["BLOCK_N"] * c["BLOCK_K"] > 8192 and c["BLOCK_K"] > gemv_k_min:
                c["BLOCK_K"] //= 2
            c["SPLIT_K"] = max(1, min(c["SPLIT_K"], cdiv(k, c["BLOCK_K"])))
            out.append(c)
    else:
        for c in DOT_CONFIGS:
            if c["BLOCK_M"] > max(16, next_pow2(m)) or (c["SPLIT_K"] > 1 and m > 64):
                continue  # tiles mostly padding, or a workspace that costs more than it saves
            c = dict(c, BLOCK_K=fit_block_k(c["BLOCK_K"], g, dot_k_min))
            c["SPLIT_K"] = max(1, min(c["SPLIT_K"], cdiv(k, c["BLOCK_K"])))
            out.append(c)
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


# -- kernels ----------------------------------------------------------------------------------

@jit
def int8_w8a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr,  # x [M,K], qweight [N,Kp], scale_t [G,N], bias [N], y [M,N]
    M, N, K, K_PER_SPLIT,                        # K_PER_SPLIT: multiple of BLOCK_K
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sg, stride_sn, stride_ym, stride_yn,
    GROUP: tl.constexpr,                         # quantization group length g
    TILE_IN_GROUP: tl.constexpr,                 # g % BLOCK_K == 0: one scale per row per tile
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + rk
        k_ok = k < k_end
        # Weights are read exactly once: stream them past the cache (evict_first).
        q = tl.load(q_ptr + rn[:, None] * stride_qn + k[None, :] * stride_qk, mask=n_ok[:, None] & k_ok[None, :],
                    other=0, eviction_policy="evict_first")
        if TILE_IN_GROUP:
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + rn * stride_sn, mask=n_ok, other=0.0)[:, None]
        else:
            s = tl.load(s_ptr + (k // GROUP)[None, :] * stride_sg + rn[:, None] * stride_sn,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = q.to(tl.float32) * s
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # upcast before any math (bf16 included)
        acc += x[:, None, :] * w[None, :, :]
    store_result(tl.sum(acc, axis=2), rm, rn, pid_k, b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@jit
def int8_w8a16_dot_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sg, stride_sn, stride_ym, stride_yn,
    GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,                     # operand dtype of tl.dot (fp16/bf16 on tensor cores, or fp32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + rk
        k_ok = k < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        # The weight tile is read transposed, [BLOCK_K, BLOCK_N], from the K-contiguous rows.
        q = tl.load(q_ptr + rn[None, :] * stride_qn + k[:, None] * stride_qk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0)
        if TILE_IN_GROUP:
            # int8 codes are exact in fp16/bf16: dot on the codes, scale the partial product.
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + rn * stride_sn, mask=n_ok, other=0.0)
            acc += tl.dot(x, q.to(DOT_DTYPE), input_precision="ieee") * s[None, :]
        else:
            s = tl.load(s_ptr + (k // GROUP)[:, None] * stride_sg + rn[None, :] * stride_sn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(x, (q.to(tl.float32) * s).to(DOT_DTYPE), input_precision="ieee")
    store_result(acc, rm, rn, pid_k, b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn, HAS_BIAS, SPLIT_K)


# -- launcher ---------------------------------------------------------------------------------

def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale_t: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, variant: str | None = None, config: dict | None = None
                ) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (qweight * scale).T + bias, in x.dtype.

    x: float32/float16/bfloat16 [M, K], any strides. qweight: int8 [N, Kp], Kp >= K a multiple
    of the group; columns >= K are ignored. scale_t: float32 [G, N] (any strides; G = Kp / g).
    bias: [N] float or None. out: optional [M, N] x.dtype to write into. variant: "gemv" / "dot"
    (default by M). config: one dict of GEMV_CONFIGS / DOT_CONFIGS (default: tuned on a GPU,
    else the first candidate).
    """
    require_triton("int8_linear")
    name = "int8_linear"
    m, k = check_x(x, name)
    check_tensor(qweight, "qweight", torch.int8, None, x.device, name)
    n, kp = qweight.shape
    groups = scale_t.shape[0] if isinstance(scale_t, torch.Tensor) and scale_t.dim() == 2 else 0
    if kp < k or groups == 0 or kp % groups:
        raise ValueError(f"{name}: qweight {tuple(qweight.shape)} and scale_t {tuple(getattr(scale_t, 'shape', ()))} "
                         f"do not describe a [N, Kp >= K={k}] weight in whole groups (x {tuple(x.shape)})")
    check_tensor(scale_t, "scale_t", torch.float32, (groups, n), x.device, name)
    g = kp // groups

    def launch(cfg, variant, y, ws, k_per_split):
        args = (x, qweight, scale_t, bias if bias is not None else y, y, ws, m, n, k, k_per_split,
                x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scale_t.stride(0), scale_t.stride(1),
                y.stride(0), y.stride(1))
        consts = dict(GROUP=g, TILE_IN_GROUP=g % cfg["BLOCK_K"] == 0, HAS_BIAS=bias is not None)
        if variant == "dot":
            consts["DOT_DTYPE"] = dot_dtype(x.dtype)
        kernel = int8_w8a16_gemv_kernel if variant == "gemv" else int8_w8a16_dot_kernel
        kernel[grid_for(variant, cfg, m, n)](*args, **consts, **launch_options(cfg))

    return run_linear(name, x, n, bias, out, variant, config, lambda v, mm: configs(v, mm, n, k, g), (g,), launch,
                      GEMV_MAX_M)
