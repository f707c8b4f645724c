"""Hypergradients: BiSSL's implicit (IFT) term and the reference-style loop used as a baseline."""
from __future__ import annotations

from bissl.hypergrad.implicit import ON_INDEFINITE, implicit_hypergrad, upper_gradient
from bissl.hypergrad.reference import reference_hypergrad
from bissl.hypergrad.settings import HypergradSettings

__all__ = sorted(["HypergradSettings", "ON_INDEFINITE", "implicit_hypergrad", "reference_hypergrad",
                  "upper_gradient"])
