"""Checks a run needs beyond the config's own validation, made before any work starts.

:mod:`bissl.config` validates keys, types, ranges and cross-field rules without importing the
compute stack. What needs the stack is checked here, once, with the same one-line
:class:`~bissl.config.ConfigError`: the λ schedule can be built (a user factory imports and accepts
its options), DeepSpeed is installed when a ZeRO stage asks for it, the device exists.
"""

from __future__ import annotations

import importlib.util

from bissl.config import Config, ConfigError


def preflight(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first key that cannot run here.

    Raises:
        ConfigError: bad ``bissl.lam_schedule``/``lam_options``, DeepSpeed missing for
            ``deepspeed.zero_stage`` >= 1 with ``run.nproc`` > 1, or an unavailable device.
    """
    from bissl.hypergrad.lam_schedules import build_lam_schedule
    from bissl.trainer.experiment import resolve_device

    try:
        build_lam_schedule(cfg.bissl.lam_schedule, cfg.bissl.lam, cfg.bissl.lam_options)
    except ValueError as err:
        raise ConfigError(f"'bissl.lam_schedule': {err}") from None
    if cfg.run.nproc > 1 and cfg.deepspeed.zero_stage >= 1 and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"'deepspeed.zero_stage' is {cfg.deepspeed.zero_stage} but DeepSpeed is not "
            "installed (pip install -e '.[distributed]'; stage 0 needs no DeepSpeed)"
        )
    resolve_device(cfg.run.device)
