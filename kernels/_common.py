"""Shared pieces of the Triton kernels: the optional import, the jit decorator, argument checks,
autotuning (configs are plain data, chosen by measurement) and the split-K reduction.

Interpreter mode. ``TRITON_INTERPRET=1`` is read by Triton when a function is decorated, and
Triton's own standard library (``tl.sum``, ``tl.interleave``...) is decorated when
``triton.language`` is first imported. So the mode is fixed per process by the environment at
the first ``import triton``; ``jit`` below follows that mode even if the variable changes later,
so that our kernels and Triton's library always agree. CPU tensors need the interpreter.
"""

from __future__ import annotations

import functools
import os
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # degrade at use, not at import (see STYLE.md, pattern 10)
    triton = None
    tl = None
    _IMPORT_ERROR: ImportError | None = err
else:
    _IMPORT_ERROR = None


def require_triton(what: str) -> None:
    """Raise a precise ImportError when Triton is missing."""
    if triton is None:
        raise ImportError(f"{what} needs Triton, which failed to import ({_IMPORT_ERROR}); "
                          f"install it with `pip install 'sparseinfer[triton]'`")


@functools.cache
def interpreting() -> bool:
    """True when this process's Triton runs kernels through the CPU interpreter (fixed at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def jit(fn):
    """``triton.jit`` in the mode Triton's language library was built in (see the module doc);
    without Triton, a stub that raises the ImportError when launched."""
    if triton is None:
        return _MissingKernel(fn.__name__)
    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)


class _MissingKernel:
    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):
        require_triton(f"sparseinfer.kernels ({self.__name__})")


# -- small helpers ----------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_dtype(x_dtype: torch.dtype):
    """The dtype operands are converted to before ``tl.dot``: the activation dtype on a GPU (tensor
    cores, fp32 accumulation), float32 for fp32 activations, and float32 for bf16 under the
    interpreter, whose bf16 arithmetic is wrong (numpy has no bf16)."""
    if x_dtype == torch.float16:
        return tl.float16
    if x_dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def check_x(x, name: str) -> tuple[int, int]:
    """Check the activations (2-D, float dtype, a device the kernels can run on); returns (M, K)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a 2-D tensor [M, K], got {got}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: activation dtype {x.dtype} is not supported (x shape {tuple(x.shape)}); "
                         f"use float32, float16 or bfloat16")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name}: x is a CPU tensor, but Triton runs CPU tensors only through its "
                           f"interpreter: set TRITON_INTERPRET=1 before triton is first imported, or move x to a GPU")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name}: x is on {x.device}; the Triton kernels run on CUDA devices (or CPU under "
                           f"TRITON_INTERPRET=1)")
    return x.shape


def check_tensor(t, name: str, dtypes, shape, device, kernel: str) -> torch.Tensor:
    """Check one kernel operand (dtype, exact shape, device); returns it."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{kernel}: {name} must be a tensor, got {type(t).__name__}")
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if t.dtype not in dtypes:
        raise ValueError(f"{kernel}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{kernel}: {name} should have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{kernel}: {name} is on {t.device} but x is on {device}")
    return t


def prepare_out(out, bias, m: int, n: int, x: torch.Tensor, kernel: str):
    """Check ``bias`` [N] and a caller-given ``out`` [M, N] (x.dtype), or allocate ``out``."""
    if bias is not None:
        check_tensor(bias, "bias", FLOAT_DTYPES, (n,), x.device, kernel)
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return check_tensor(out, "out", x.dtype, (m, n), x.device, kernel)


# -- autotuning: configs are data, the choice is measured --------------------------------------

def cpu_do_bench(fn, quantiles=None, **_) -> float | list[float]:
    """A ``do_bench`` for the interpreter (Triton's needs a GPU): one timed call, in ms."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def autotune_enabled() -> bool:
    """SPARSEINFER_TRITON_AUTOTUNE=1/0 forces tuning on/off; default: on a GPU only (under the
    interpreter the first config of each list is used, so tests pick configs explicitly)."""
    env = os.environ.get("SPARSEINFER_TRITON_AUTOTUNE")
    if env is not None:
        return env == "1"
    return not interpreting()


class Tuner:
    """Measures every config of a list once per key and remembers the fastest. Unlike
    ``@triton.autotune`` it times the whole launch (kernel + split-K reduction), so split-K is
    chosen by what it really costs, and it needs no ``reset_to_zero`` (no atomics anywhere)."""

    def __init__(self):
        self.best: dict = {}

    def pick(self, key, configs: list[dict], run) -> dict:
        if key in self.best:
            return self.best[key]
        if len(configs) == 1 or not autotune_enabled():
            return configs[0]
        bench = cpu_do_bench if interpreting() else (lambda f, **kw: triton.testing.do_bench(f, warmup=5, rep=20))
        timings = []
        for cfg in configs:
            try:
                timings.append(bench(lambda: run(cfg)))
            except Exception as err:  # noqa: BLE001 - a config that cannot compile/run (e.g. out of shared memory)
                if "OutOfResources" not in type(err).__name__ and "out of resource" not in str(err).lower():
                    raise
                timings.append(float("inf"))
        self.best[key] = configs[min(range(len(configs)), key=timings.__getitem__)]
        return self.best[key]


TUNER = Tuner()


def m_bucket(m: int) -> int:
    """Batch sizes share a tuned config within a power-of-two bucket (capped at 256)."""
    return min(next_pow2(m), 256)


# -- split-K: partial sums [S, M, N] in float32, then one reduction (deterministic) ---------------

def _splitk_reduce_kernel(
    ws_ptr, b_ptr, y_ptr,                      # partials [S, M, N] fp32, bias [N] or None, y [M, N]
    M, N, stride_ym, stride_yn,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


splitk_reduce_kernel = jit(_splitk_reduce_kernel)


def workspace(split_k: int, m: int, n: int, device) -> torch.Tensor:
    """Partial sums of a split-K launch (every element is written by the kernel: no zeroing)."""
    return torch.empty(split_k * m * n if split_k > 1 else 1, dtype=torch.float32, device=device)


def splitk_reduce(ws: torch.Tensor, split_k: int, bias, y: torch.Tensor) -> None:
    m, n = y.shape
    grid = (cdiv(m, 16), cdiv(n, 64))
    splitk_reduce_kernel[grid](ws, bias if bias is not None else ws, y, m, n, y.stride(0), y.stride(1),
                               SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=64,
                               num_warps=4, enable_fp_fusion=True)


# -- the common epilogue of every linear kernel ---------------------------------------------------

def _store_result(
    acc, rm, rn, pid_k,                        # acc fp32 [BLOCK_M, BLOCK_N] for rows rm, columns rn
    b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        # Whole K summed here: add the bias in fp32 and round once to the output dtype.
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        # A partial sum: fp32 into this split's slice of the workspace; splitk_reduce finishes.
        tl.store(ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)


store_result = jit(_store_result)


def finish(ws, split_k: int, bias, y) -> torch.Tensor:
    """After a kernel launch: reduce split-K partials (adding the bias) into ``y``."""
    if split_k > 1:
        splitk_reduce(ws, split_k, bias, y)
    return y


def _swizzle(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (Triton tutorial 03): GROUP_M row-blocks walk the columns together so
    that the weight tiles they share are still in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


swizzle = jit(_swizzle)


def run_linear(name: str, x: torch.Tensor, n: int, bias, out, variant: str | None, config: dict | None,
               configs_fn, key: tuple, launch, gemv_max_m: int, k_units: int | None = None,
               block_key: str = "BLOCK_K") -> torch.Tensor:
    """The launcher steps shared by every family, after its operand checks: allocate/check the
    output, pick the variant (GEMV for small batches) and config (given, tuned, or the first
    candidate), then ``launch(cfg, variant, y, ws, k_per_split)`` and finish split-K. The K loop
    runs over ``k_units`` (default K columns) in blocks of ``cfg[block_key]``."""
    m, k = x.shape
    k_units = k if k_units is None else k_units
    y = prepare_out(out, bias, m, n, x, name)
    variant = variant or ("gemv" if m <= gemv_max_m else "dot")
    if variant not in ("gemv", "dot"):
        raise ValueError(f"{name}: unknown variant {variant!r}; expected 'gemv' or 'dot'")
    if m == 0:
        return y

    def run(cfg):
        cfg = dict(cfg)
        cfg.setdefault("BLOCK_M", next_pow2(min(m, gemv_max_m)))
        cfg.setdefault("SPLIT_K", 1)
        split_k = cfg["SPLIT_K"]
        k_per_split = cdiv(cdiv(k_units, cfg[block_key]), split_k) * cfg[block_key]
        ws = workspace(split_k, m, n, x.device)
        launch(cfg, variant, y, ws, k_per_split)
        return finish(ws, split_k, bias, y)

    if config is None:
        full_key = (name, variant, m_bucket(m), n, k, x.dtype, bias is not None, x.device.type) + tuple(key)
        config = TUNER.pick(full_key, configs_fn(variant, m), run)
    return run(config)


def grid_for(variant: str, cfg: dict, m: int, n: int) -> tuple:
    """GEMV: (N tiles, M tiles, splits); dot: (swizzled M x N tiles, splits)."""
    if variant == "gemv":
        return (cdiv(n, cfg["BLOCK_N"]), cdiv(m, cfg["BLOCK_M"]), cfg["SPLIT_K"])
    return (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])


def launch_options(cfg: dict) -> dict:
    """A config dict as launch keywords: its block sizes (constexprs) plus num_warps/num_stages.
    ``enable_fp_fusion`` is passed explicitly: leaving it unset makes Triton 3.9 warn."""
    opts = dict(cfg)
    opts.setdefault("num_warps", 4)
    opts.setdefault("num_stages", 2)
    opts["enable_fp_fusion"] = True
    return opts
