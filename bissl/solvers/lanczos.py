"""Lanczos tridiagonals that Krylov solvers build for free, and the spectrum estimates they give.

CG and MINRES both work in the Krylov space ``K_k(M, b)`` of the damped operator
``M = scale·A + shift·I`` they run on. The Lanczos process writes ``M`` restricted to that space as
a symmetric tridiagonal ``T_k = Q_kᵀ M Q_k`` (``Q_k`` orthonormal), and its eigenvalues — the *Ritz
values* — lie inside ``[λ_min(M), λ_max(M)]``; the extreme ones approach ``λ_min``/``λ_max`` as ``k``
grows (Kaniel–Paige theory; Golub & Van Loan, "Matrix Computations", §10.1). So the extremes and the
ratio ``ritz_max / ritz_min`` are *inner* estimates: ``ritz_min ≥ λ_min(M)``, ``ritz_max ≤ λ_max(M)``
and the condition estimate is a lower bound of ``κ(M)``.

* MINRES runs Lanczos explicitly: ``T`` has diagonal ``α_j`` and off-diagonal ``β_{j+1}``.
* CG runs it implicitly; with CG's step ``α_j`` and direction weight ``β_j``
  (Golub & Van Loan §10.2; Saad, "Iterative Methods for Sparse Linear Systems", §6.7.3)::

      T[j, j]   = 1/α_j + β_{j-1}/α_{j-1}     (β_{-1}/α_{-1} = 0)
      T[j, j+1] = sqrt(β_j) / α_j

  ``1/α_j = pⱼᵀMpⱼ / rⱼᵀrⱼ`` is also the ``j``-th pivot of ``T = L D Lᵀ``: ``T_k`` is positive definite
  exactly when every ``pᵀMp > 0``. When CG meets ``pⱼᵀMpⱼ ≤ 0`` it stops, but that row of ``T`` is
  still known (it needs ``pⱼᵀMpⱼ / rⱼᵀrⱼ``, not ``α_j``); including it makes the smallest Ritz value
  ``≤ 0``, so "negative curvature" and "a non-positive Ritz value" flag the same event.

Everything here is built from 0-dim device scalars with fixed shapes and ``torch.where``: no host
synchronisation. Only the eigenvalue computation itself (``torch.linalg.eigvalsh`` on a ``k×k``
matrix) may synchronise — on CUDA it does (PyTorch documents it) — so :class:`SolveResult` runs it
lazily, when an estimate is first read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Tridiagonal:
    """A symmetric tridiagonal of which only some leading rows are valid, in fixed-size storage.

    Attributes:
        diag: ``(k,)`` diagonal.
        off: ``(k,)`` ``off[j] = T[j, j+1]`` (the last entry and entries next to invalid rows are 0).
        valid: ``(k,)`` bool, a prefix of True: the rows the solver actually produced.
    """

    diag: Tensor
    off: Tensor
    valid: Tensor

    def padded_matrix(self) -> Tensor:
        """``(k, k)`` matrix whose eigenvalues are the Ritz values plus copies of ``T[0, 0]``.

        Invalid rows are decoupled and get the diagonal value ``T[0, 0]``. That value is the Rayleigh
        quotient of the first Lanczos vector, which lies between the smallest and largest Ritz value
        (Cauchy interlacing), so the padded matrix has the same extreme eigenvalues as the valid block
        and needs no host-side slicing.
        """
        first = self.diag[:1].expand_as(self.diag)
        diag = torch.where(self.valid, self.diag, first)
        both = self.valid & torch.cat([self.valid[1:], self.valid.new_zeros(1)])
        off = torch.where(both, self.off, 0)[:-1]
        return torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)

    def ritz_extremes(self) -> tuple[Tensor, Tensor]:
        """``(ritz_min, ritz_max)`` as 0-dim tensors; NaN when no row is valid (or NaN entered).

        Runs ``eigvalsh`` on the ``(k, k)`` padded matrix (synchronises on CUDA).
        """
        nan = torch.full((), float("nan"), dtype=self.diag.dtype, device=self.diag.device)
        if self.diag.numel() == 0:
            return nan, nan
        T = self.padded_matrix()
        usable = self.valid[0] & torch.isfinite(T).all()
        # eigvalsh must not see NaN/Inf (LAPACK may fail); feed a harmless matrix and mask after.
        eig = torch.linalg.eigvalsh(torch.where(usable, T, torch.zeros_like(T)))
        return torch.where(usable, eig[0], nan), torch.where(usable, eig[-1], nan)

    def ritz_values(self) -> Tensor:
        """All Ritz values ``(m,)`` ascending, ``m`` = number of valid rows (one host sync)."""
        m = int(self.valid.sum())
        if m == 0:
            return self.diag.new_zeros(0)
        T = self.padded_matrix()[:m, :m]
        return torch.linalg.eigvalsh(T)


def cg_tridiagonal(alphas: Tensor, betas: Tensor, breakdown_curvature: Tensor | None = None) -> Tridiagonal:
    """The Lanczos tridiagonal of a CG run from its step sizes.

    Args:
        alphas: ``(k,)`` CG step sizes, 0 where an iteration was skipped (a suffix: once CG stops
            it stays stopped).
        betas: ``(k,)`` direction weights ``β_j = r_{j+1}ᵀr_{j+1} / r_jᵀr_j``, 0 where skipped.
        breakdown_curvature: 0-dim ``pᵀMp / rᵀr`` of the iteration at which CG stopped on
            ``pᵀMp ≤ 0`` (NaN if it did not): adds that row, whose pivot is ``≤ 0``.

    Returns:
        :class:`Tridiagonal` with ``k`` rows of storage.
    """
    k = alphas.shape[0]
    if k == 0:
        return Tridiagonal(alphas, betas, alphas != 0)
    stepped = alphas != 0
    inv_alpha = torch.where(stepped, 1 / torch.where(stepped, alphas, 1), 0)
    # β_{j-1}/α_{j-1}, the contribution of the previous direction to the Rayleigh quotient of r_j.
    carry = torch.cat([alphas.new_zeros(1), (betas * inv_alpha)[:-1]])
    diag = inv_alpha + carry
    off = torch.sqrt(betas.clamp_min(0)) * inv_alpha
    valid = stepped
    if breakdown_curvature is not None:
        m = stepped.sum()
        is_break = (torch.arange(k, device=alphas.device) == m) & torch.isfinite(breakdown_curvature)
        diag = torch.where(is_break, breakdown_curvature + carry, diag)
        valid = stepped | is_break
    return Tridiagonal(diag, off, valid)


def lanczos_tridiagonal(alphas: Tensor, betas: Tensor, valid: Tensor) -> Tridiagonal:
    """The tridiagonal of an explicit Lanczos run (MINRES).

    Args:
        alphas: ``(k,)`` ``α_j = v_jᵀ M v_j``.
        betas: ``(k,)`` ``β_{j+1} = ‖M v_j − α_j v_j − β_j v_{j−1}‖`` (the entry below row ``j``).
        valid: ``(k,)`` bool prefix of iterations that ran.
    """
    return Tridiagonal(alphas, betas, valid)
