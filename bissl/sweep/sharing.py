"""What a sweep may compute once and reuse: THE rule, in one place.

Per seed the pipeline is ``pretext`` -> ``bissl`` -> ``finetune_bissl`` (the BiSSL arm) and, from
the same pretext checkpoint, ``finetune_baseline`` and the configured control arms
(``pretext_matched`` -> ``finetune_baseline_matched``, ``bissl_upper0`` -> ``finetune_bissl_upper0``):
together "the baseline arm" here, switched by ``baseline.enabled``.
Every phase seeds itself from ``(seed, phase name)`` only (:func:`bissl.trainer.run_phase`), so a
phase's result depends on its config keys and its inputs, never on what ran before it. Hence:

* when no swept key can change the pretext phase, every cell's ``pretext.done.pt`` of a seed is
  the same file, so the first cell (the *provider*) computes it and the other cells start from a
  hard link to it (``run_experiment`` resumes past a finished phase);
* when no swept key can change the baseline arm either, the provider's baseline is every cell's
  baseline, and the other cells run with ``baseline.enabled=false``.

Which keys reach which part (:func:`parts_affected`) is decided from the key's section, and is
conservative: a key not known to be confined to the BiSSL stage or to fine-tuning reaches
everything (data, model, pretext, task, text, deepspeed, run.* keys that change the numerics such
as ``run.device``, ``run.num_threads`` or ``run.workers``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bissl.config import Config

PRETEXT, BISSL_ARM, BASELINE_ARM = "pretext", "bissl arm", "baseline arm"
_ALL = frozenset({PRETEXT, BISSL_ARM, BASELINE_ARM})

#: Keys that change no result: logging, progress bars and checkpoint cadence (a resumed phase is
#: bit-identical to an uninterrupted one, whatever the cadence).
NO_EFFECT_KEYS = ("run.quiet", "run.log_every", "run.checkpoint_every")
#: The ``bissl.*`` keys the compute-matched baseline also reads (``baseline.compute_matched``): it
#: continues pretext training for ``stages × lower_steps`` steps with the lower level's LARS
#: settings.
MATCHED_BASELINE_KEYS = ("bissl.stages", "bissl.lower_steps", "bissl.lower")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def parts_affected(key: str, *, compute_matched: bool = False, ablation_upper0: bool = False) -> frozenset[str]:
    """The parts of the pipeline a dotted config key can change.

    Args:
        key: e.g. ``"bissl.lam"``, ``"finetune.lr"``, ``"model.options.width"``.
        compute_matched: whether the baseline arm is compute-matched (it then reads some
            ``bissl.*`` keys, :data:`MATCHED_BASELINE_KEYS`).
        ablation_upper0: whether the control arms include BiSSL without upper steps (it then
            reads every ``bissl.*`` key, conservatively).

    Returns:
        A subset of ``{PRETEXT, BISSL_ARM, BASELINE_ARM}``.
    """
    if key in NO_EFFECT_KEYS:
        return frozenset()
    if _under(key, "bissl"):
        if ablation_upper0:
            return frozenset({BISSL_ARM, BASELINE_ARM})
        if compute_matched and any(_under(key, k) for k in MATCHED_BASELINE_KEYS):
            return frozenset({BISSL_ARM, BASELINE_ARM})
        return frozenset({BISSL_ARM})
    if _under(key, "finetune"):  # both arms fine-tune with it (BiSSL's head/augmentation too)
        return frozenset({BISSL_ARM, BASELINE_ARM})
    if _under(key, "baseline"):
        return frozenset({BASELINE_ARM})
    return _ALL


@dataclass(frozen=True)
class SharingPlan:
    """What the cells of one sweep share.

    Attributes:
        pretext: the other cells start from the provider's pretext checkpoints.
        baseline: the other cells skip the baseline arm; the provider's is everyone's.
        provider: the cell that runs everything (the first cell), or None without sharing.
        reason: one line saying why (which key prevents what).
    """

    pretext: bool
    baseline: bool
    provider: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_sharing(
    keys: Sequence[str], cell_names: Sequence[str], configs: Iterable[Config], *, enabled: bool = True
) -> SharingPlan:
    """Apply the rule to a grid.

    Args:
        keys: the swept keys.
        cell_names: the cells in run order (the first one provides).
        configs: every cell's resolved config (for ``baseline.enabled/compute_matched``).
        enabled: ``False`` turns sharing off (``--no-share``).
    """
    if not enabled:
        return SharingPlan(False, False, None, "sharing turned off")
    if len(cell_names) < 2:
        return SharingPlan(False, False, None, "a single cell has nothing to share")
    configs = list(configs)
    matched = any(c.baseline.compute_matched for c in configs)
    upper0 = any(c.baseline.ablation_upper0 for c in configs)
    has_baseline = all(c.baseline.enabled for c in configs)
    affected = {key: parts_affected(key, compute_matched=matched, ablation_upper0=upper0) for key in keys}
    blocks_pretext = [k for k, parts in affected.items() if PRETEXT in parts]
    blocks_baseline = [k for k, parts in affected.items() if BASELINE_ARM in parts]
    pretext = not blocks_pretext
    baseline = pretext and has_baseline and not blocks_baseline
    if not pretext:
        reason = f"'{blocks_pretext[0]}' changes the pretext phase: every cell runs everything"
    elif not has_baseline:
        reason = "pretext shared; no baseline arm to share (baseline.enabled is false)"
    elif not baseline:
        reason = f"pretext shared; '{blocks_baseline[0]}' changes the baseline arm: it runs per cell"
    else:
        reason = "pretext and baseline arm shared: only the BiSSL arm depends on the swept keys"
    return SharingPlan(pretext, baseline, cell_names[0] if pretext else None, reason)
