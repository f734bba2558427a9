"""N:M structured sparsity (``NMWeight``): y = x @ W.T + bias where every group of M consecutive
weights along K keeps at most N, stored compressed -- float values, or int8 / int4 codes with
their own group scales (2:4+int8, 2:4+int4) -- plus b-bit in-group indices (the metadata).

Operands (Kc = kept values per row = ceil(K / M) * N)::

    x        [M_rows, K]             float32 / float16 / bfloat16, any strides
    values   float [N_out, Kc]         (VKIND 0), or
             int8  [N_out, Kcp]        codes (VKIND 1), or
             uint8 [N_out, Kcp / 2]    int4 codes, low nibble first (VKIND 2)
    scale_t  float32 [Gv, N_out]      value scales over groups of ``vgroup`` kept values (quantized)
    zero_t   uint8 [Gv, N_out]        int4 zero points, or None (= 8)
    meta     uint8 [N_out, ceil(Kc * bits / 8)]
             little-endian bit stream, ``bits`` in {1, 2, 4, 8}: kept value c's index inside its
             group lies in bits [c * bits, (c + 1) * bits) -- never across a byte. That is the
             canonical layout (sparseinfer/formats/nm.py) whenever ceil(log2 M) is a power of two (2:4, 1:4, 1:2, 4:16);
             ``repack_meta`` widens the others (4:8's 3 bits -> 4) once, at prepack.

Decoding happens in registers, never in memory:

* ``gemv`` (decoding batches) streams the compressed rows like a dense int8/int4 GEMV over Kc
  columns: BLOCK_C consecutive kept values and their metadata bytes load as contiguous,
  vectorizable rows; the bit fields are expanded with shifts, and only the activations are
  gathered, at column ``(c // N) * M + index`` (x is small and cached) -- only kept weights
  cost arithmetic, and any N:M works (no power-of-two N needed).
* ``dot`` rebuilds the dense weight tile [BLOCK_G * M_P2, BLOCK_N] with one compare-and-select
  per kept slot (a static loop over the N slots of a group: ``where(index == j, value, w)``)
  and feeds it to ``tl.dot`` against the matching dense activation tile. M that is not a power
  of two is padded to M_P2 positions whose activations are masked to zero.
"""

from __future__ import annotations

import torch

from sparseinfer.formats.nm import index_bits, pack_bits, unpack_bits

from ._common import (check_tensor, check_x, dot_dtype, grid_for, jit, launch_options, next_pow2, require_triton,
                      run_linear, store_result, swizzle, tl)
from .int8_linear import configs as _int8_configs

GEMV_MAX_M = 8
MAX_M = 32  # groups up to 32 wide (5-bit indices, stored in 8)


def meta_bits(m: int) -> int:
    """Bits per index in the kernels' layout: ceil(log2 m) rounded up to a power of two."""
    return next_pow2(max(1, (m - 1).bit_length()))


def repack_meta(meta: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """Canonical meta (ceil(log2 m) bits per index) -> the kernels' layout (``meta_bits(m)`` bits);
    returns ``meta`` itself when the widths agree."""
    if meta_bits(m) == index_bits(m):
        return meta
    return pack_bits(unpack_bits(meta, index_bits(m), count), meta_bits(m))


def configs(variant: str, m: int, n: int, kc: int, group_m: int, vgroup: int) -> list[dict]:
    """The int8 tilings over the compressed rows. GEMV: BLOCK_K becomes BLOCK_C kept values per
    step (shrunk to a power-of-two value group, as for int8, so a tile has one scale per row).
    Dot: BLOCK_G whole groups per K tile, BLOCK_G * M_P2 >= 16 positions."""
    mp2 = next_pow2(group_m)
    out = []
    for c in _int8_configs(variant, m, n, kc, vgroup, gemv_k_min=16):
        c = dict(c)
        if variant == "gemv":
            c["BLOCK_C"] = c.pop("BLOCK_K")
        else:
            c["BLOCK_G"] = max(c.pop("BLOCK_K") // mp2, max(1, 16 // mp2))
        if c not in out:
            out.append(c)
    return out


@jit
def _load_slot(
    v_ptr, s_ptr, z_ptr, e_ptr, rn, c, mask,     # rn, c: broadcastable row / kept-value index tensors
    stride_vn, stride_vc, stride_sg, stride_sn, stride_zg, stride_zn, stride_en, stride_ek,
    BITS: tl.constexpr, VKIND: tl.constexpr, VGROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
):
    """(value as fp32, index within its group) of kept values ``c`` of rows ``rn``."""
    bit = c * BITS
    meta = tl.load(e_ptr + rn * stride_en + (bit // 8) * stride_ek, mask=mask, other=0).to(tl.int32)
    idx = (meta >> (bit % 8)) & ((1 << BITS) - 1)
    if VKIND == 0:
        v = tl.load(v_ptr + rn * stride_vn + c * stride_vc, mask=mask, other=0.0, eviction_policy="evict_first")
        v = v.to(tl.float32)
    else:
        if VKIND == 1:
            q = tl.load(v_ptr + rn * stride_vn + c * stride_vc, mask=mask, other=0, eviction_policy="evict_first")
            q = q.to(tl.int32)
        else:
            byte = tl.load(v_ptr + rn * stride_vn + (c // 2) * stride_vc, mask=mask, other=0,
                           eviction_policy="evict_first").to(tl.int32)
            q = (byte >> ((c & 1) * 4)) & 0xF
            if HAS_ZERO:
                q -= tl.load(z_ptr + (c // VGROUP) * stride_zg + rn * stride_zn, mask=mask, other=0).to(tl.int32)
            else:
                q -= 8
        s = tl.load(s_ptr + (c // VGROUP) * stride_sg + rn * stride_sn, mask=mask, other=0.0)
        v = q.to(tl.float32) * s
    return v, idx


@jit
def nm_gemv_kernel(
    x_ptr, v_ptr, s_ptr, z_ptr, e_ptr, b_ptr, y_ptr, ws_ptr,   # e_ptr: metadata
    M, N, K, KC, C_PER_SPLIT, VB, EB,          # KC kept values per row; VB, EB: row lengths of values, meta
    stride_xm, stride_xk, stride_vn, stride_vc, stride_sg, stride_sn, stride_zg, stride_zn, stride_en, stride_ek,
    stride_ym, stride_yn,
    NSEL: tl.constexpr, MGRP: tl.constexpr,      # N:M
    BITS: tl.constexpr, VKIND: tl.constexpr, VGROUP: tl.constexpr,
    TILE_IN_VGROUP: tl.constexpr,                # VGROUP % BLOCK_C == 0: one value scale per row per tile
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,  # BLOCK_C kept values per step
):
    # The compressed rows are streamed like a dense int8/int4 GEMV over Kc columns: values and
    # metadata of BLOCK_C consecutive kept values load as contiguous (vectorizable) rows; only the
    # activations are gathered, at column (c // NSEL) * MGRP + index.
    FIELDS: tl.constexpr = 8 // BITS             # indices per metadata byte
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    c_begin = pid_k * C_PER_SPLIT
    c_end = tl.minimum(c_begin + C_PER_SPLIT, KC)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_C), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_end
        # -- metadata: BLOCK_C // FIELDS whole bytes, expanded to one index per kept value ------
        eb = c0 // FIELDS + tl.arange(0, BLOCK_C // FIELDS)
        e = tl.load(e_ptr + rn[:, None] * stride_en + eb[None, :] * stride_ek, mask=n_ok[:, None] & (eb < EB)[None, :],
                    other=0).to(tl.int32)
        shift = tl.arange(0, FIELDS) * BITS     # little-endian: the first index in the lowest bits
        idx = tl.reshape((e[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, BLOCK_C))
        # -- values (masks keep loads inside the row; x below is masked to this split) ----------
        if VKIND == 2:
            vb = c0 // 2 + tl.arange(0, BLOCK_C // 2)
            byte = tl.load(v_ptr + rn[:, None] * stride_vn + vb[None, :] * stride_vc,
                           mask=n_ok[:, None] & (vb < VB)[None, :], other=0, eviction_policy="evict_first")
            byte = byte.to(tl.int32)
            q = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_C))  # low nibble = even c
        else:
            q = tl.load(v_ptr + rn[:, None] * stride_vn + c[None, :] * stride_vc,
                        mask=n_ok[:, None] & (c < VB)[None, :], other=0, eviction_policy="evict_first")
        if VKIND == 0:
            v = q.to(tl.float32)
        else:
            if TILE_IN_VGROUP:
                g_off = c0 // VGROUP
                s = tl.load(s_ptr + g_off * stride_sg + rn * stride_sn, mask=n_ok, other=0.0)[:, None]
                if HAS_ZERO:
                    z = tl.load(z_ptr + g_off * stride_zg + rn * stride_zn, mask=n_ok, other=0)
                    z = z.to(tl.int32)[:, None]
            else:
                g_off = (c // VGROUP)[None, :]
                gmask = n_ok[:, None] & c_ok[None, :]
                s = tl.load(s_ptr + g_off * stride_sg + rn[:, None] * stride_sn, mask=gmask, other=0.0)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g_off * stride_zg + rn[:, None] * stride_zn, mask=gmask, other=0)
                    z = z.to(tl.int32)
            if VKIND == 1:
                v = q.to(tl.float32) * s
            elif HAS_ZERO:
                v = (q.to(tl.int32) - z).to(tl.float32) * s
            else:
                v = (q.to(tl.int32) - 8).to(tl.float32) * s
        # -- gather the activations of the kept columns ------------------------------------------
        col = (c // NSEL)[None, :] * MGRP + idx
        xm = m_ok[:, None, None] & (n_ok[:, None] & c_ok[None, :] & (col < K))[None, :, :]
        xv = tl.load(x_ptr + rm[:, None, None] * stride_xm + col[None, :, :] * stride_xk, mask=xm, other=0.0)
        acc += xv.to(tl.float32) * v[None, :, :]
    store_result(tl.sum(acc, axis=2), rm, rn, pid_k, b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@jit
def nm_dot_kernel(
    x_ptr, v_ptr, s_ptr, z_ptr, e_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, KG, G_PER_SPLIT,
    stride_xm, stride_xk, stride_vn, stride_vc, stride_sg, stride_sn, stride_zg, stride_zn, stride_en, stride_ek,
    stride_ym, stride_yn,
    NSEL: tl.constexpr, MGRP: tl.constexpr, M_P2: tl.constexpr,
    BITS: tl.constexpr, VKIND: tl.constexpr, VGROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_M: tl.constexpr,
):
    BLOCK_K: tl.constexpr = BLOCK_G * M_P2  # dense positions per K tile (padded groups)
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, M_P2)
    m_ok = rm < M
    n_ok = rn < N
    g_begin = pid_k * G_PER_SPLIT
    g_end = tl.minimum(g_begin + G_PER_SPLIT, KG)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(g_begin, g_end, BLOCK_G):
        gg = g0 + tl.arange(0, BLOCK_G)
        # Dense activations [BLOCK_M, BLOCK_G, M_P2]: position j of group gg is column gg*MGRP + j.
        col = gg[:, None] * MGRP + rj[None, :]
        c_ok = (rj < MGRP)[None, :] & (gg < g_end)[:, None] & (col < K)
        x = tl.load(x_ptr + rm[:, None, None] * stride_xm + col[None, :, :] * stride_xk,
                    mask=m_ok[:, None, None] & c_ok[None, :, :], other=0.0)
        x = tl.reshape(x.to(DOT_DTYPE), (BLOCK_M, BLOCK_K))
        # Decompress the weight tile in registers, transposed: [BLOCK_G, M_P2, BLOCK_N].
        mask = (gg < g_end)[:, None] & n_ok[None, :]
        w = tl.zeros((BLOCK_G, M_P2, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(NSEL):
            v, idx = _load_slot(v_ptr, s_ptr, z_ptr, e_ptr, rn[None, :], (gg * NSEL + s)[:, None], mask,
                                stride_vn, stride_vc, stride_sg, stride_sn, stride_zg, stride_zn, stride_en,
                                stride_ek, BITS, VKIND, VGROUP, HAS_ZERO)
            w = tl.where(idx[:, None, :] == rj[None, :, None], v[:, None, :], w)
        w = tl.reshape(w.to(DOT_DTYPE), (BLOCK_K, BLOCK_N))
        acc = tl.dot(x, w, acc, input_precision="ieee")
    store_result(acc, rm, rn, pid_k, b_ptr, y_ptr, ws_ptr, M, N, stride_ym, stride_yn, HAS_BIAS, SPLIT_K)


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n_keep: int, m_group: int,
              bias: torch.Tensor | None = None, *, scale_t: torch.Tensor | None = None,
              zero_t: torch.Tensor | None = None, value_format: str | None = None, out: torch.Tensor | None = None,
              variant: str | None = None, config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias for an N:M weight W (n_keep of every m_group), in x.dtype.

    x: float32/float16/bfloat16 [M, K], any strides. values: float [N, Kc] when value_format is
    None; int8 [N, Kcp] ("int8") or uint8 [N, Kcp/2] ("int4") codes with scale_t float32 [Gv, N]
    over groups of Kcp / Gv kept values, and for asymmetric int4 zero_t uint8 [Gv, N]. meta: uint8
    [N, ceil(Kc * meta_bits(m_group) / 8)] (``repack_meta`` of the canonical one). Kc = ceil(K /
    m_group) * n_keep. bias, out, variant, config: as in ``int8_linear`` (GEMV configs step
    BLOCK_C kept values, dot configs BLOCK_G groups).
    """
    require_triton("nm_linear")
    name = "nm_linear"
    m, k = check_x(x, name)
    if not (isinstance(n_keep, int) and isinstance(m_group, int) and 1 <= n_keep < m_group <= MAX_M):
        raise ValueError(f"{name}: unsupported sparsity {n_keep}:{m_group}; need 1 <= N < M <= {MAX_M}")
    kg = -(-k // m_group)
    kc = kg * n_keep
    kinds = {None: (0, (torch.float32, torch.float16, torch.bfloat16), 1), "int8": (1, torch.int8, 1),
             "int4": (2, torch.uint8, 2)}
    if value_format not in kinds:
        raise ValueError(f"{name}: unknown value format {value_format!r}; expected None, 'int8' or 'int4'")
    vkind, vdtype, per_byte = kinds[value_format]
    check_tensor(values, "values", vdtype, None, x.device, name)
    if values.dim() != 2 or values.shape[1] * per_byte < kc:
        raise ValueError(f"{name}: values {tuple(values.shape)} hold fewer than the Kc={kc} kept values per row of "
                         f"a {n_keep}:{m_group} weight with K={k}")
    n = values.shape[0]
    bits = meta_bits(m_group)
    check_tensor(meta, "meta", torch.uint8, (n, -(-kc * bits // 8)), x.device, name)
    vgroup = 1
    if vkind:
        if scale_t is None or scale_t.dim() != 2 or (values.shape[1] * per_byte) % scale_t.shape[0]:
            raise ValueError(f"{name}: {value_format} values {tuple(values.shape)} need scale_t [Gv, {n}] over whole "
                             f"groups, got {None if scale_t is None else tuple(scale_t.shape)}")
        check_tensor(scale_t, "scale_t", torch.float32, (scale_t.shape[0], n), x.device, name)
        vgroup = values.shape[1] * per_byte // scale_t.shape[0]
        if zero_t is not None:
            check_tensor(zero_t, "zero_t", torch.uint8, tuple(scale_t.shape), x.device, name)
    s = scale_t if scale_t is not None else meta
    z = zero_t if zero_t is not None else s

    def launch(cfg, variant, y, ws, per_split):
        k_args = (kc, per_split, values.shape[1], meta.shape[1]) if variant == "gemv" else (kg, per_split)
        args = (x, values, s, z, meta, bias if bias is not None else y, y, ws, m, n, k, *k_args,
                x.stride(0), x.stride(1), values.stride(0), values.stride(1), s.stride(0), s.stride(1),
                z.stride(0), z.stride(1), meta.stride(0), meta.stride(1), y.stride(0), y.stride(1))
        consts = dict(NSEL=n_keep, MGRP=m_group, BITS=bits, VKIND=vkind, VGROUP=vgroup,
                      HAS_ZERO=zero_t is not None, HAS_BIAS=bias is not None)
        if variant == "gemv":
            consts["TILE_IN_VGROUP"] = vgroup % cfg["BLOCK_C"] == 0
            nm_gemv_kernel[grid_for(variant, cfg, m, n)](*args, **consts, **launch_options(cfg))
        else:
            consts.update(M_P2=next_pow2(m_group), DOT_DTYPE=dot_dtype(x.dtype))
            nm_dot_kernel[grid_for(variant, cfg, m, n)](*args, **consts, **launch_options(cfg))

    # The GEMV walks the Kc kept values of a row (BLOCK_C per step), the dot kernel its groups.
    gemv = (variant or ("gemv" if m <= GEMV_MAX_M else "dot")) == "gemv"
    return run_linear(name, x, n, bias, out, variant, config, lambda v, mm: configs(v, mm, n, kc, m_group, vgroup),
                      (n_keep, m_group, value_format, vgroup, zero_t is not None), launch, GEMV_MAX_M,
                      k_units=kc if gemv else kg, block_key="BLOCK_C" if gemv else "BLOCK_G")
