"""Layer 1: stateless functional ops on parameter dicts and flat buffers.

HVPs (:mod:`bissl.ops.hvp`), the BatchNorm policy for them, dict ↔ flat conversion and the fused
vector ops with their backends.
"""

from __future__ import annotations

from bissl.ops._backends import available_backends, backend_report
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.flat import FlatSpec, flat_spec, flat_view, flatten, flatten_module_parameters_, unflatten
from bissl.ops.fused import axpby, cg_direction_, cg_step_, damped_matvec, prox_grad
from bissl.ops.hvp import HVP_MODES, LinearizedHVP, hvp, hvp_batched, linearize_hvp
from bissl.ops.hvp_mode import HVPModeError, select_hvp_mode

__all__ = [
    "HVP_MODES",
    "FlatSpec",
    "HVPModeError",
    "LinearizedHVP",
    "available_backends",
    "axpby",
    "backend_report",
    "batchnorm_stats_frozen",
    "cg_direction_",
    "cg_step_",
    "damped_matvec",
    "flat_spec",
    "flat_view",
    "flatten",
    "flatten_module_parameters_",
    "hvp",
    "hvp_batched",
    "linearize_hvp",
    "prox_grad",
    "select_hvp_mode",
    "unflatten",
]
