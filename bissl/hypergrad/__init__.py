"""Hypergradients: BiSSL's implicit (IFT) term and the reference-style loop used as a baseline."""
from __future__ import annotations

from bissl.hypergrad.implicit import ON_INDEFINITE, implicit_hypergrad, upper_gradient
from bissl.hypergrad.reference import authors_cg_solver, reference_hypergrad

__all__ = sorted(["ON_INDEFINITE", "authors_cg_solver", "implicit_hypergrad", "reference_hypergrad", "upper_gradient"])
