"""Unstructured sparsity (``CSRWeight``): y = x @ W.T + bias with W in compressed sparse rows.

Operands::

    x       [M, K]       float32 / float16 / bfloat16, any strides
    crow    int64 [N+1]  row n holds entries crow[n] .. crow[n+1]-1
    col     int32 [nnz]  their columns
    values  [nnz]        float, or int8 codes with
    scale   float32 [N]  a per-row scale (csr+int8)

Two ways to run it, chosen per weight and batch bucket by measurement (``CSRPlan``):

* ``triton``: ``csr_spmm_kernel``, one program per (output row, BLOCK_M batch rows); it walks the
  row's non-zeros BLOCK_NZ at a time, gathers the matching activation columns (cached: x is
  small next to W for decoding batches) and keeps a [BLOCK_M, BLOCK_NZ] fp32 accumulator,
  reduced once. Rows are independent, so there is no split-K and no atomics.
* ``torch``: ``torch.sparse.mm`` on a CSR tensor (cuSPARSE on CUDA), values dequantized to
  x.dtype once per dtype and cached.

Where the crossover between them lies (density, batch, GPU) is measured on the machine, not
guessed: ``CSRPlan.method`` times both with ``triton.testing.do_bench`` the first time a batch
bucket is seen and remembers the faster. Under the interpreter the Triton kernel is always used.
"""

from __future__ import annotations

import os
import warnings

import torch

from ._common import (TUNER, cdiv, check_tensor, check_x, interpreting, jit, launch_options, m_bucket, next_pow2,
                      prepare_out, require_triton, tl, triton)

# BLOCK_M rows of x per program (<= 16; more rows start a new program), BLOCK_NZ non-zeros per step.
CONFIGS = [
    dict(BLOCK_NZ=128, num_warps=4, num_stages=2),
    dict(BLOCK_NZ=256, num_warps=4, num_stages=2),
    dict(BLOCK_NZ=64, num_warps=2, num_stages=2),
    dict(BLOCK_NZ=512, num_warps=8, num_stages=2),
]
MAX_BLOCK_M = 16


@jit
def csr_spmm_kernel(
    x_ptr, crow_ptr, col_ptr, v_ptr, s_ptr, b_ptr, y_ptr,   # s_ptr: per-row scale (int8 values)
    M, stride_xm, stride_xk, stride_ym, stride_yn,
    QUANTIZED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    row = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_NZ), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NZ):
        j = j0 + tl.arange(0, BLOCK_NZ)
        j_ok = j < end
        c = tl.load(col_ptr + j, mask=j_ok, other=0)
        v = tl.load(v_ptr + j, mask=j_ok, other=0, eviction_policy="evict_first").to(tl.float32)
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + c[None, :] * stride_xk, mask=m_ok[:, None] & j_ok[None, :],
                     other=0.0)
        acc += xv.to(tl.float32) * v[None, :]
    out = tl.sum(acc, axis=1)
    if QUANTIZED:
        out *= tl.load(s_ptr + row)  # one scale per row: applied once, after the sum
    if HAS_BIAS:
        out += tl.load(b_ptr + row).to(tl.float32)
    tl.store(y_ptr + rm * stride_ym + row * stride_yn, out.to(y_ptr.dtype.element_ty), mask=m_ok)


def _check_operands(x, crow, col, values, scale, k: int, name: str):
    m, kx = check_x(x, name)
    if kx != k:
        raise ValueError(f"{name}: x of shape {tuple(x.shape)} does not match K={k}")
    check_tensor(crow, "crow", torch.int64, None, x.device, name)
    if crow.dim() != 1 or crow.numel() < 2:
        raise ValueError(f"{name}: crow must be 1-D [N+1] with N >= 1, got {tuple(crow.shape)}")
    check_tensor(col, "col", torch.int32, None, x.device, name)
    nnz = col.numel()
    if scale is None:
        check_tensor(values, "values", (torch.float32, torch.float16, torch.bfloat16), (nnz,), x.device, name)
    else:
        check_tensor(values, "values", torch.int8, (nnz,), x.device, name)
        check_tensor(scale, "scale", torch.float32, (crow.numel() - 1,), x.device, name)
    for t, nm in ((crow, "crow"), (col, "col"), (values, "values")):
        if not t.is_contiguous():
            raise ValueError(f"{name}: {nm} must be contiguous")
    return m, crow.numel() - 1


def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, k: int,
               bias: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias with the Triton SpMM kernel, in x.dtype.

    x: float32/float16/bfloat16 [M, K], any strides. crow: int64 [N+1]; col: int32 [nnz]
    (< K); values: float [nnz], or int8 [nnz] with scale float32 [N]. bias: [N] or None. out:
    optional [M, N] x.dtype. config: one dict of CONFIGS (default: tuned on a GPU, else the first).
    """
    require_triton("csr_linear")
    name = "csr_linear"
    m, n = _check_operands(x, crow, col, values, scale, k, name)
    y = prepare_out(out, bias, m, n, x, name)
    if m == 0:
        return y
    block_m = min(next_pow2(m), MAX_BLOCK_M)

    def run(cfg):
        grid = (n, cdiv(m, block_m))
        csr_spmm_kernel[grid](x, crow, col, values, scale if scale is not None else values,
                              bias if bias is not None else y, y, m, x.stride(0), x.stride(1), y.stride(0),
                              y.stride(1), QUANTIZED=scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                              **launch_options(cfg))
        return y

    if config is None:
        key = (name, m_bucket(m), n, k, col.numel(), x.dtype, scale is not None, bias is not None, x.device.type)
        config = TUNER.pick(key, CONFIGS, run)
    return run(config)


class CSRPlan:
    """What the backend keeps per CSR weight (built once by prepack): the canonical tensors, the
    torch.sparse CSR tensors per activation dtype (built on first use), and per batch bucket the
    measured-faster method."""

    def __init__(self, crow, col, values, scale, shape):
        self.crow, self.col, self.values, self.scale = crow, col, values, scale
        self.shape = tuple(shape)
        self._sparse: dict = {}
        self.choice: dict = {}  # (m bucket, dtype) -> "triton" | "torch"

    def sparse(self, dtype: torch.dtype) -> torch.Tensor:
        """W as a torch CSR tensor [N, K] of ``dtype`` (values dequantized)."""
        if dtype not in self._sparse:
            v = self.values.to(torch.float32)
            if self.scale is not None:
                rows = torch.repeat_interleave(torch.arange(self.shape[0], device=v.device), self.crow.diff())
                v = v * self.scale[rows]
            with warnings.catch_warnings():  # "CSR support is in beta": known, and not actionable here
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
                self._sparse[dtype] = torch.sparse_csr_tensor(self.crow, self.col.to(torch.int64), v.to(dtype),
                                                              size=self.shape, check_invariants=False)
        return self._sparse[dtype]

    def run_torch(self, x, bias, out=None):
        y = torch.sparse.mm(self.sparse(x.dtype), x.T).T
        if bias is not None:
            y = y + bias.to(y.dtype)
        if out is None:
            return y.contiguous()
        return out.copy_(y)

    def run_triton(self, x, bias, out=None, config=None):
        return csr_linear(x, self.crow, self.col, self.values, self.shape[1], bias, scale=self.scale, out=out,
                          config=config)

    def method(self, x: torch.Tensor, bias) -> str:
        """"triton" or "torch" for this call: SPARSEINFER_CSR_METHOD forces one; the interpreter
        always runs Triton; on a GPU the first call of each batch bucket times both."""
        forced = os.environ.get("SPARSEINFER_CSR_METHOD")
        if forced in ("triton", "torch"):
            return forced
        if interpreting() or x.device.type != "cuda":
            return "triton"
        key = (m_bucket(x.shape[0]), x.dtype)
        if key not in self.choice:
            bench = triton.testing.do_bench
            t_triton = bench(lambda: self.run_triton(x, bias), warmup=5, rep=20)
            try:
                t_torch = bench(lambda: self.run_torch(x, bias), warmup=5, rep=20)
            except RuntimeError:  # e.g. no cuSPARSE kernel for this dtype
                t_torch = float("inf")
            self.choice[key] = "triton" if t_triton <= t_torch else "torch"
        return self.choice[key]

    def linear(self, x, bias, out=None):
        if self.method(x, bias) == "torch":
            return self.run_torch(x, bias, out)
        return self.run_triton(x, bias, out)
