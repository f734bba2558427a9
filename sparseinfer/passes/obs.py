"""What SparseGPT and GPTQ share: the dampened inverse Hessian's upper Cholesky factor and the
papers' settings (optimal brain surgeon updates over columns, Frantar & Alistarh 2022/2023)."""

from __future__ import annotations

import torch

PERCDAMP = 0.01  # dampening: a fraction of the mean diagonal of H, added to H (the papers' default)
BLOCKSIZE = 128  # columns per lazy-update block (a multiple of M for N:M)


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = PERCDAMP,
                             diag_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U float32 [K, K] upper with U^T U = (H + damp I)^-1; ``dead`` marks columns that
    never saw a non-zero input (their H diagonal is 0; they get a unit diagonal and are zeroed by the
    callers). Dampening grows tenfold while the factorisation fails (a rank-deficient H).
    diag_only: return diag(U) [K] instead of U (the pruning score's denominators): diag(R^-1) is
    1 / diag(R), so the triangular solve, as costly as the Cholesky itself, is skipped."""
    h = hessian.double().clone()
    k = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.diag(h).mean()
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    flip = torch.arange(k - 1, -1, -1, device=h.device)
    for _ in range(8):
        # With J the order reversal and J H J = L L^T, H = R R^T for the upper R = J L J, so
        # H^-1 = (R^-1)^T R^-1 and R^-1 = J L^-1 J is the upper factor wanted: one Cholesky and one
        # triangular solve (cholesky_inverse + a second Cholesky cost several times more on CPU).
        chol, info = torch.linalg.cholesky_ex((h + damp * eye)[flip][:, flip])
        if int(info) == 0 and diag_only:
            d = (1 / torch.diagonal(chol))[flip]
            if torch.isfinite(d).all():
                return d.float(), dead
        elif int(info) == 0:
            upper = torch.linalg.solve_triangular(chol, eye, upper=False)[flip][:, flip]
            if torch.isfinite(upper).all():
                return upper.float(), dead
        damp = damp * 10
    raise ValueError(f"the calibration Hessian ({k}x{k}) is not positive definite even with heavy dampening; "
                     f"calibrate with more (or more varied) data")
