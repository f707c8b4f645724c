"""Hypergradients: BiSSL's implicit (IFT) term, a differentiable solution map, and the
reference-style loop used as a baseline (with the authors' CG solver, faithfully)."""

from __future__ import annotations

from bissl.hypergrad.implicit import ON_INDEFINITE, implicit_hypergrad, solve_ift_system, upper_gradient
from bissl.hypergrad.reference import authors_cg_solver, reference_hypergrad
from bissl.hypergrad.settings import HypergradSettings
from bissl.hypergrad.solution_map import argmin, custom_argmin

__all__ = [
    "ON_INDEFINITE",
    "HypergradSettings",
    "argmin",
    "authors_cg_solver",
    "custom_argmin",
    "implicit_hypergrad",
    "reference_hypergrad",
    "solve_ift_system",
    "upper_gradient",
]
