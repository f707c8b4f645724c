"""Experiment configuration: YAML/JSON file + dotted overrides -> validated nested dataclasses.

Every hyperparameter of the BiSSL pipeline (``docs/method.md``) is a key here, with the published
ImageNet-scale default (ResNet-50, 96 px). A file only needs the keys it changes.

This module is a leaf: it imports nothing from the rest of ``bissl`` (and no torch), so validating
a config file never loads the compute stack. Checks that need the stack (a user λ-schedule factory,
DeepSpeed being installed, the data) run when a run starts (:mod:`bissl.trainer.preflight`).

Validation is strict so that a typo can never silently fall back to a default:

* an unknown key raises ``ConfigError("config error: unknown key 'bissl.lamda' (did you mean 'lam'?)")``;
* a value of the wrong type or out of range raises a one-line ``ConfigError`` naming the dotted key.

Example:
    >>> cfg = load_config("bissl/configs/demo_digits.yaml", overrides=["bissl.lam=0.01"])
    >>> cfg.bissl.lam
    0.01
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "AugmentConfig",
    "BaselineConfig",
    "BisslConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "DeepSpeedConfig",
    "FinetuneConfig",
    "LowerConfig",
    "ModelConfig",
    "PretextConfig",
    "RunConfig",
    "TextConfig",
    "UpperConfig",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "diff_configs",
    "dump_config",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """A bad configuration; ``str(err)`` is a one-line message naming the offending key."""

    def __init__(self, message: str) -> None:
        super().__init__(f"config error: {message}")


# --------------------------------------------------------------------------- field helpers
Check = Callable[[Any], str | None]


def _ge(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _gt(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def _in01(*, open_hi: bool = False) -> Check:
    def check(v: float) -> str | None:
        ok = 0.0 <= v < 1.0 if open_hi else 0.0 <= v <= 1.0
        return None if ok else f"must be in [0, 1{')' if open_hi else ']'}"

    return check


def _each(check: Check) -> Check:
    def each(values: list) -> str | None:
        for i, v in enumerate(values):
            msg = check(v)
            if msg:
                return f"item {i} {msg}"
        return None

    return each


def _length(n: int, check: Check | None = None) -> Check:
    def length(values: list) -> str | None:
        if len(values) != n:
            return f"must have {n} items, got {len(values)}"
        return check(values) if check else None

    return length


def _one_of(*allowed: Any) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(str, allowed))}"


def _nonempty(values: list) -> str | None:
    return None if len(values) > 0 else "must not be empty"


def _opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A dataclass field with a help string and an optional value check (skipped for None)."""
    if isinstance(default, (list, dict)):
        frozen = json.dumps(default)  # each instance gets its own copy
        return field(default_factory=lambda: json.loads(frozen), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


# --------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """Run-level keys: seeds, device, where outputs go, checkpoint cadence."""

    name: str | None = _opt(None, "run directory name under out_dir (default: config file stem)")
    out_dir: str = _opt("runs", "parent directory of run directories")
    seeds: list[int] = _opt(
        [0],
        "training seeds; each seed runs the full pipeline in seed_<s>/",
        lambda v: _nonempty(v) or _each(_ge(0))(v) or (None if len(set(v)) == len(v) else "must not repeat a seed"),
    )
    device: str = _opt(
        "auto",
        "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'",
        lambda v: (
            None if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) else "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ),
    )
    num_threads: int | None = _opt(
        None, "torch CPU threads per process (default: torch's choice; with workers > 1: cores // workers)", _ge(1)
    )
    workers: int = _opt(
        1,
        "seeds run in parallel processes (on CPU, 2 one-thread processes beat one two-thread process on small models)",
        _ge(1),
    )
    checkpoint_every: int = _opt(200, "save a checkpoint every N optimizer steps (and at phase ends)", _ge(1))
    log_every: int = _opt(1, "write a metrics row every N steps (CG diagnostics: every upper step)", _ge(1))
    cudnn_benchmark: bool = _opt(
        False, "torch.backends.cudnn.benchmark (faster convs on GPU, not bit-reproducible across runs)"
    )
    deterministic: bool = _opt(False, "torch.use_deterministic_algorithms(True) (slower on GPU)")
    quiet: bool = _opt(False, "no progress bars")
    nproc: int = _opt(
        1,
        "ranks of the run (`bissl run --nproc N`): every phase runs data-parallel "
        "on N processes (gloo on CPU, NCCL on GPUs), each rank taking its shard "
        "of every global batch; ZeRO stage per the 'deepspeed' section",
        _ge(1),
    )
    dtype: Literal["float32", "float64"] = _opt(
        "float32",
        "floating-point type of models and batches (float64: exactness checks; "
        "ZeRO stages >= 1 keep float32 master weights and refuse it)",
    )


@dataclass
class DataConfig:
    """Datasets. The downstream set is split train/val/test; the pretext set defaults to its train split."""

    name: str = _opt("digits", "downstream dataset: 'digits' (built in), 'npz' or 'imagefolder'")
    root: str | None = _opt(None, "path of the downstream data (npz file or image folder)")
    pretext_name: str | None = _opt(None, "pretext dataset (default: the downstream train split without labels)")
    pretext_root: str | None = _opt(None, "path of the pretext data")
    val_fraction: float = _opt(0.1, "fraction of the downstream data held out for validation", _in01(open_hi=True))
    test_fraction: float = _opt(0.2, "fraction of the downstream data held out for testing", _in01(open_hi=True))
    split_seed: int = _opt(0, "seed of the train/val/test split (fixed across training seeds)", _ge(0))
    image_size: int | None = _opt(None, "resize images to this side (default: the dataset's)", _ge(1))
    labels_per_class: int | None = _opt(
        None,
        "labelled training images per class: required by 'digits_lowlabel' (drawn from the "
        "images left after the val/test split, which are all its pretext images), optional "
        "for 'digits_transfer' (default: its whole training split)",
        _ge(1),
    )
    pretext_classes: list[int] | None = _opt(
        None, "'digits_transfer': digit classes whose images are the pretext set (default 0-4)"
    )
    downstream_classes: list[int] | None = _opt(
        None, "'digits_transfer': digit classes of the downstream task, relabelled 0..k-1 in this order (default 5-9)"
    )
    folds: int | None = _opt(
        None,
        "text tasks: stratified k-fold (by play for 'shakespeare_genre'): fold 'fold' is "
        "the test split, val is val_fraction of the other folds, test_fraction is not "
        "used; repeats are values of split_seed (null: the fixed val/test split)",
        _ge(2),
    )
    fold: int = _opt(0, "with 'folds': the test fold, 0..folds-1", _ge(0))
    fold_by_seed: bool = _opt(
        False,
        "with 'folds' (repeated k-fold): seed s tests fold s mod folds of the partition "
        "split_seed + s div folds, so seeds 0..r*folds-1 are r repeats and every labelled text "
        "is tested r times; each seed's split (and, when the pretext corpus is the training "
        "split, its tokenizer) is its own",
    )


@dataclass
class ModelConfig:
    """Backbone architecture."""

    backbone: str = _opt("resnet50", "'small_cnn', 'resnet18', 'resnet50' or 'gpt' (text)")
    options: dict[str, Any] = _opt({}, "extra keyword arguments of bissl.models.build_backbone")
    channels_last: bool = _opt(False, "use channels_last memory format (faster convs on GPU)")
    sync_bn: bool = _opt(
        True,
        "with run.nproc > 1, BatchNorm layers normalise with the statistics "
        "of the global batch (all ranks), as a single process would; false: "
        "each rank normalises with its own shard",
    )


@dataclass
class AugmentConfig:
    """Two-view augmentation (BYOL-style asymmetric pair, :class:`bissl.tasks.TwoViewAugment`)."""

    preset: Literal["auto", "byol", "tiny"] = _opt(
        "auto",
        "'byol' (the reference: crop (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, "
        "grayscale 0.2, blur p 1.0/0.1, solarize 0/0.2), 'tiny' (for <= 16 px images), "
        "'auto' (tiny for <= 16 px, else byol)",
    )
    view1: dict[str, Any] = _opt({}, "overrides of view 1's ViewConfig fields (e.g. blur_p: 0.5)")
    view2: dict[str, Any] = _opt({}, "overrides of view 2's ViewConfig fields")


@dataclass
class PretextConfig:
    """Self-supervised pretraining (pipeline step 1)."""

    method: Literal["simclr", "byol", "gpt"] = _opt(
        "simclr", "pretext task: 'simclr' or 'byol' (images), 'gpt' (next-token prediction, text)"
    )
    epochs: int = _opt(500, "pretraining epochs", _ge(0))
    batch_size: int = _opt(1024, "pretext batch size", _ge(2))
    lr: float = _opt(4.8, "LARS base learning rate", _gt(0))
    momentum: float = _opt(0.9, "LARS momentum", _in01(open_hi=True))
    weight_decay: float = _opt(1e-6, "LARS weight decay", _ge(0))
    eta: float = _opt(1e-3, "LARS trust coefficient", _gt(0))
    warmup_epochs: float = _opt(10, "linear warm-up epochs of the cosine schedule", _ge(0))
    final_lr_factor: float = _opt(1e-3, "cosine ends at this fraction of the base lr", _in01())
    temperature: float = _opt(0.5, "SimCLR NT-Xent temperature", _gt(0))
    gather_negatives: bool = _opt(
        True,
        "SimCLR with run.nproc > 1: score each rank's queries "
        "against the embeddings of all ranks (the global batch), "
        "gradients flowing through the gather; false: negatives "
        "from the rank's own shard only",
    )
    projector_dims: list[int] = _opt(
        [256, 256, 256],
        "projector widths (hidden, hidden, output); the BYOL predictor has the same shape",
        lambda v: _nonempty(v) or _each(_ge(1))(v),
    )
    byol_ema: float = _opt(0.9995, "BYOL target EMA momentum", _in01())
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: Literal["lars", "adamw"] = _opt(
        "lars",
        "'lars' (the reference; lr, momentum, weight_decay, eta) or 'adamw' (lr, "
        "weight_decay on weight matrices only, betas; the usual choice for GPT "
        "pretraining); same cosine schedule",
    )
    betas: list[float] = _opt([0.9, 0.999], "AdamW (β1, β2)", _length(2, _each(_in01(open_hi=True))))


@dataclass
class LowerConfig:
    """Lower-level optimizer of the BiSSL stage (LARS on θ and the pretext head)."""

    lr: float = _opt(1.0, "LARS base learning rate", _gt(0))
    momentum: float = _opt(0.9, "LARS momentum", _in01(open_hi=True))
    weight_decay: float = _opt(1e-6, "LARS weight decay", _ge(0))
    eta: float = _opt(1e-3, "LARS trust coefficient", _gt(0))
    warmup_steps: int = _opt(200, "linear warm-up steps of the cosine schedule", _ge(0))
    final_lr_factor: float = _opt(0.0, "cosine ends at this fraction of the base lr", _in01())
    batch_size: int = _opt(1024, "pretext batch size of lower steps", _ge(2))
    optimizer: Literal["lars", "sgd"] = _opt("lars", "'lars' (the reference) or 'sgd' (momentum, same lr/wd)")


@dataclass
class UpperConfig:
    """Upper-level optimizer of the BiSSL stage (SGD on φ and ψ_D); also the head warm-up's lr/wd."""

    lr: float = _opt(0.015, "SGD learning rate (per dataset; CIFAR-10 SimCLR: 0.015)", _gt(0))
    weight_decay: float = _opt(1e-3, "SGD weight decay", _ge(0))
    momentum: float = _opt(0.9, "SGD momentum", _in01(open_hi=True))
    final_lr_factor: float = _opt(0.0, "cosine ends at this fraction of the base lr", _in01())
    batch_size: int = _opt(256, "downstream batch size of upper steps and head warm-up", _ge(1))


@dataclass
class BisslConfig:
    """The bilevel stage (pipeline step 2)."""

    stages: int = _opt(500, "training stages (each: lower_steps, then upper_steps)", _ge(0))
    lower_steps: int = _opt(20, "lower-level steps per training stage", _ge(0))
    upper_steps: int = _opt(8, "upper-level steps per training stage", _ge(0))
    head_warmup_epochs: float = _opt(20, "epochs of downstream-head warm-up (backbone frozen)", _ge(0))
    lam: float = _opt(1e-3, "λ: weight of the proximal term (λ/2)‖θ−φ‖²", _gt(0))
    damping: float = _opt(10.0, "λ_damp: the linear system is (I + H/(λ+λ_damp)) x = v", _ge(0))
    gamma: float = _opt(1.0, "γ: weight of the direct upper term L_D(φ, ψ_D)", _ge(0))
    cg_iters: int = _opt(5, "iterations of the inverse-HVP solver", _ge(0))
    exact_check_iters: int = _opt(
        0,
        "diagnostic: on the first upper step of each stage also solve the same system with MINRES "
        "to this many iterations and log the hypergradient's cosine to it (metrics 'hg_cos_exact'; 0: off)",
        _ge(0),
    )
    solver: Literal["cg", "cg_layerwise", "minres", "neumann", "identity"] = _opt(
        "cg", "inverse-HVP solver ('cg_layerwise' reproduces the reference code; 'minres' handles indefinite systems)"
    )
    on_indefinite: Literal["raise", "warn", "fallback", "adaptive_damping"] = _opt(
        "fallback",
        "what an upper step does when the solver flags I + H/(λ+λ_damp) indefinite: "
        "'fallback' (default: re-solve the same system with fallback_solver; MINRES "
        "solves symmetric indefinite systems), 'adaptive_damping' (re-solve with a "
        "larger damping), 'warn' (keep the flagged answer) or 'raise' (stop)",
    )
    fallback_solver: Literal["minres", "identity", "cg", "cg_layerwise", "neumann"] = _opt(
        "minres", "solver of on_indefinite: fallback"
    )
    hvp_mode: Literal["revrev", "fwdrev", "autograd", "auto"] | None = _opt(
        None,
        "HVP mode of bissl.ops.linearize_hvp (default: the core's, 'revrev'; 'auto': "
        "'fwdrev' where the model supports forward-mode AD, else 'revrev')",
    )
    hvp_batch_size: int | None = _opt(
        None, "pretext batch for H, drawn once per stage (default: lower.batch_size)", _ge(2)
    )
    clip_norm: float = _opt(10.0, "total gradient-norm clip of lower and upper steps", _gt(0))
    on_nonfinite: Literal["skip", "raise"] = _opt(
        "skip",
        "an upper step whose hypergradient has NaN/Inf entries: 'skip' it (no update of φ "
        "and ψ_D; counted in the metrics column 'skipped' and warned every time) or "
        "'raise' (stop, naming the step); it is never zeroed",
    )
    backend: str | None = _opt(None, "kernel backend of bissl.ops (default: automatic)")
    lam_schedule: str = _opt(
        "constant",
        "lower-level regularisation scale over training: 'constant' (λ = lam), "
        "'grad_ratio' (λ keeps the proximal gradient λ‖θ−φ‖ at lam_options.ratio × "
        "the pretext gradient norm), 'distance' (λ grows with ‖θ−φ‖), "
        "'grad_ratio_per_tensor' (grad_ratio per backbone tensor: one λ per tensor in both "
        "levels), or "
        "'package.module:callable' (see bissl.hypergrad.lam_schedules)",
    )
    lam_options: dict[str, Any] = _opt({}, "options of lam_schedule (e.g. ratio, ema, min, max)")
    direct_term: Literal["phi", "theta"] = _opt(
        "phi",
        "where the direct upper term γ∇L_D is evaluated: 'phi' (the paper: ∇_φ L_D(φ)) or "
        "'theta' (γ∇_θ L_D(θ), reusing the hypergradient's forward)",
    )
    prox_pull: float = _opt(
        0.0,
        "ρ: add ρ·λ(φ − θ) to the upper φ-gradient (the gradient of the "
        "proximal term in φ: pulls φ toward θ); 0 is the paper",
        _ge(0),
    )
    lower: LowerConfig = field(default_factory=LowerConfig)
    upper: UpperConfig = field(default_factory=UpperConfig)


@dataclass
class FinetuneConfig:
    """Fine-tuning protocol shared by both arms (pipeline step 3)."""

    epochs: int = _opt(400, "fine-tuning epochs", _ge(1))
    batch_size: int = _opt(256, "batch size", _ge(1))
    lr: float = _opt(0.015, "SGD learning rate (tune on val: the reference searches log-uniform 1e-4..1)", _gt(0))
    weight_decay: float = _opt(1e-3, "SGD weight decay (reference search range 1e-5..1e-2)", _ge(0))
    momentum: float = _opt(0.9, "SGD momentum", _in01(open_hi=True))
    final_lr_factor: float = _opt(0.0, "cosine ends at this fraction of the base lr", _in01())
    head: Literal["linear", "mlp"] = _opt("linear", "downstream head")
    augment: Literal["none", "crop"] = _opt(
        "none",
        "fine-tuning (and upper-step) augmentation: 'none', or 'crop': the pretext "
        "preset's random resized crop and flip, no colour changes",
    )
    eval_every_epochs: int = _opt(1, "evaluate on val every N epochs (and after the last)", _ge(1))
    mode: Literal["full", "linear_probe"] = _opt(
        "full",
        "'full' (backbone and head trained) or 'linear_probe' (backbone frozen with "
        "BatchNorm in eval mode, only the head trained: the read-out that sees the "
        "backbone most directly)",
    )
    optimizer: Literal["sgd", "adamw"] = _opt(
        "sgd",
        "'sgd' (momentum; lr, momentum, weight_decay) or 'adamw' (lr, weight_decay on weight matrices only, betas)",
    )
    betas: list[float] = _opt([0.9, 0.999], "AdamW (β1, β2)", _length(2, _each(_in01(open_hi=True))))


@dataclass
class BaselineConfig:
    """The baseline arm: the pretext checkpoint fine-tuned with the identical protocol."""

    enabled: bool = _opt(True, "run the baseline arm (and the control arms below when they are on)")
    compute_matched: bool = _opt(
        False,
        "also run the compute-matched baseline arm 'baseline_matched': pretext training continued for "
        "the BiSSL stage's number of lower steps (the lower level's optimizer and schedule), then fine-tuned",
    )
    ablation_upper0: bool = _opt(
        False,
        "also run the ablation arm 'bissl_upper0': the BiSSL stage with upper_steps 0 (its lower steps "
        "only, φ never updated), then fine-tuned from θ",
    )


@dataclass
class DebugConfig:
    """Fault injection for testing resume (never needed in real runs)."""

    stop_after_steps: int | None = _opt(
        None, "interrupt the process after this many optimizer steps (counted in this process)", _ge(1)
    )
    stop_mode: Literal["raise", "exit"] = _opt("raise", "'raise' RunInterrupted, or 'exit': os._exit(75) like a kill")
    stop_rank: int | None = _opt(
        None,
        "with run.nproc > 1: only this rank stops (the launcher "
        "then stops the others), like one killed rank; default: "
        "every rank",
        _ge(0),
    )


@dataclass
class TextConfig:
    """Text runs (``task: text``): tokenizer and sequence lengths."""

    tokenizer: Literal["bpe", "bytes"] = _opt(
        "bpe",
        "'bpe' (byte-level BPE trained on the pretext corpus, saved with the run) or "
        "'bytes' (256 byte values + specials, nothing to train)",
    )
    vocab_size: int = _opt(2048, "BPE vocabulary size (specials included)", _ge(260))
    seq_len: int = _opt(64, "tokens per pretext (next-token) training sequence", _ge(2))
    max_length: int = _opt(64, "downstream texts are truncated/padded to this many tokens", _ge(2))
    probes: bool = _opt(
        True,
        "also report, per seed and on the same split and tokens, the majority class of the "
        "training split and a bag-of-tokens logistic regression (arms 'majority', 'bag_of_tokens')",
    )


#: DeepSpeed JSON sections that would fight the BiSSL step, and why (refused in ``deepspeed.config``).
_DS_REFUSED_TOP = {
    "optimizer": "the optimizers are torch optimizers built from the config",
    "scheduler": "the LR schedules are built from the config",
    "fp16": "the HVP/CG path runs in float32",
    "bf16": "the HVP/CG path runs in float32",
    "amp": "the HVP/CG path runs in float32",
}
_DS_REFUSED_ZERO = {
    "offload_optimizer": "ZeRO offload needs DeepSpeed's JIT-built CPU Adam op",
    "offload_param": "ZeRO offload needs DeepSpeed's JIT-built CPU Adam op",
}


@dataclass
class DeepSpeedConfig:
    """Data-parallel memory layout of multi-rank runs (``run.nproc > 1``).

    Stage 0 is plain data parallelism (gradients averaged with flat bucketed all-reduces; no
    DeepSpeed needed); stages 1-3 wrap every model in a DeepSpeed engine with that ZeRO stage
    (optimizer states, + gradients, + parameters sharded). Bucket sizes are element counts;
    DeepSpeed allocates whole buckets up front, so they are part of every rank's memory.
    """

    zero_stage: int = _opt(0, "0 (plain data parallel), 1, 2 or 3 (DeepSpeed ZeRO)", _one_of(0, 1, 2, 3))
    reduce_bucket_size: int = _opt(5_000_000, "elements per gradient reduce bucket (ZeRO)", _ge(1))
    allgather_bucket_size: int = _opt(5_000_000, "elements per all-gather bucket (ZeRO 1-2)", _ge(1))
    overlap_comm: bool = _opt(False, "overlap gradient reduction with backward (ZeRO)")
    contiguous_gradients: bool = _opt(True, "copy gradients into a contiguous buffer (ZeRO)")
    stage3_prefetch_bucket_size: int = _opt(5_000_000, "ZeRO-3 parameter prefetch bucket", _ge(1))
    stage3_param_persistence_threshold: int = _opt(
        100_000, "ZeRO-3 keeps parameters smaller than this unpartitioned", _ge(1)
    )
    stage3_max_live_parameters: int = _opt(1_000_000_000, "ZeRO-3 live parameter budget", _ge(1))
    stage3_max_reuse_distance: int = _opt(1_000_000_000, "ZeRO-3 parameter reuse distance", _ge(1))
    hypergrad_bucket_numel: int | None = _opt(
        None, "elements per all-reduce bucket of the hypergradient's vectors (null: one collective per vector)", _ge(1)
    )
    shard_hypergrad: bool | None = _opt(
        None,
        "each rank keeps only its partition of CG's vectors and right-hand side (HVPs "
        "reduce-scattered, dots all-reduced); null: on at ZeRO-3, off below",
    )
    config: str | None = _opt(
        None, "a DeepSpeed JSON file used as the base of the engines' config (the keys above override it)"
    )

    def validate(self) -> None:
        """Check the JSON base file, when given (sections that would fight the BiSSL step)."""
        if self.config is None:
            return
        path = Path(self.config)
        try:
            base = json.loads(path.read_text())
        except OSError as err:
            raise ConfigError(f"'deepspeed.config': cannot read {path}: {err.strerror}") from None
        except ValueError as err:
            raise ConfigError(f"'deepspeed.config': {path} is not JSON ({err})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"'deepspeed.config': {path} must hold a JSON object")
        for key, why in _DS_REFUSED_TOP.items():
            section = base.get(key)
            if section is not None and (not isinstance(section, dict) or section.get("enabled", True)):
                raise ConfigError(f"'deepspeed.config': {key!r} is not supported ({why})")
        if base.get("gradient_accumulation_steps", 1) != 1:
            raise ConfigError(
                "'deepspeed.config': gradient_accumulation_steps must be 1 (one "
                "engine step per optimizer step of the pipeline)"
            )
        zero = base.get("zero_optimization", {})
        for key, why in _DS_REFUSED_ZERO.items():
            section = zero.get(key)
            if section and (not isinstance(section, dict) or section.get("device", "none") != "none"):
                raise ConfigError(f"'deepspeed.config': zero_optimization.{key} is not supported ({why})")

    @property
    def sharded_hypergrad(self) -> bool:
        """Whether CG's vectors are partitioned across ranks (``shard_hypergrad``, default: ZeRO-3)."""
        return self.zero_stage == 3 if self.shard_hypergrad is None else self.shard_hypergrad


@dataclass
class Config:
    """The whole experiment. ``config_from_dict`` builds it from nested dicts with validation."""

    task: Literal["vision", "text"] = _opt("vision", "'vision' (images) or 'text' (token sequences)")
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    bissl: BisslConfig = field(default_factory=BisslConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    text: TextConfig = field(default_factory=TextConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        """Cross-field checks (single-field checks run while building)."""
        if self.data.val_fraction + self.data.test_fraction >= 1.0:
            raise ConfigError("'data.val_fraction' + 'data.test_fraction' must be < 1")
        if (
            self.bissl.stages > 0
            and self.bissl.upper_steps > 0
            and self.bissl.cg_iters == 0
            and self.bissl.solver != "identity"
        ):
            raise ConfigError("'bissl.cg_iters' must be >= 1 unless 'bissl.solver' is 'identity'")
        if self.bissl.on_indefinite == "fallback" and self.bissl.fallback_solver == self.bissl.solver:
            raise ConfigError(
                "'bissl.fallback_solver' must differ from 'bissl.solver' when 'bissl.on_indefinite' is 'fallback'"
            )
        if self.bissl.lam_schedule == "grad_ratio_per_tensor" and self.bissl.on_indefinite == "adaptive_damping":
            raise ConfigError(
                "'bissl.lam_schedule' 'grad_ratio_per_tensor' gives one λ per tensor; "
                "'bissl.on_indefinite: adaptive_damping' needs a single λ"
            )
        self.deepspeed.validate()
        if self.run.dtype == "float64" and self.run.nproc > 1 and self.deepspeed.zero_stage >= 1:
            raise ConfigError(
                "'run.dtype' is 'float64' but ZeRO stages >= 1 keep float32 master "
                "weights; use deepspeed.zero_stage 0 for float64"
            )
        if self.run.nproc > 1:
            self._validate_ranks()
        if self.data.fold_by_seed and (self.data.folds is None or self.data.fold != 0):
            raise ConfigError(
                "'data.fold_by_seed' needs 'data.folds' (the number of folds) and leaves "
                f"'data.fold' at 0 (each seed picks its fold); got folds {self.data.folds}, fold {self.data.fold}"
            )
        text_pretext = self.pretext.method == "gpt"
        if (self.task == "text") != text_pretext:
            raise ConfigError(
                f"'task' is {self.task!r} but 'pretext.method' is "
                f"{self.pretext.method!r}; text runs use 'gpt', image runs "
                "'simclr' or 'byol'"
            )

    def _validate_ranks(self) -> None:
        """What ``run.nproc > 1`` needs: global batches that split into equal shards, one device
        per rank. (Batch sizes capped at a dataset's size are checked again when a phase starts.)"""
        n = self.run.nproc
        batches = {
            "pretext.batch_size": self.pretext.batch_size,
            "bissl.lower.batch_size": self.bissl.lower.batch_size,
            "bissl.upper.batch_size": self.bissl.upper.batch_size,
            "bissl.hvp_batch_size": self.bissl.hvp_batch_size,
            "finetune.batch_size": self.finetune.batch_size,
        }
        for key, size in batches.items():
            if size is not None and size % n:
                raise ConfigError(
                    f"'{key}' is {size}, not a multiple of run.nproc {n} (each rank "
                    "takes an equal shard of every global batch)"
                )
        if re.fullmatch(r"cuda:\d+", self.run.device):
            raise ConfigError(
                f"'run.device' is {self.run.device!r}; with run.nproc > 1 use 'auto', "
                "'cpu' or 'cuda' (rank r computes on cuda:r)"
            )


# --------------------------------------------------------------------------- building and checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"'{key}' must be finite, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not input


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix or '<root>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown key '{path}'{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], path)
            continue
        value = _coerce(raw[name], tp, path)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            msg = check(value)
            if msg:
                raise ConfigError(f"'{path}' {msg}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts (missing keys take the defaults).

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value (the message names the key).
    """
    cfg = _build(Config, raw if raw is not None else {}, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (round-trips through :func:`config_from_dict`)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- files and overrides
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.1 requires a dot: ``1.0e-6``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_text(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        line = str(err).replace("\n", " ")
        raise ConfigError(f"cannot parse {source}: {line}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"bissl.lam=0.01"`` -> ``(["bissl", "lam"], 0.01)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like 'section.key=value'")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        raise ConfigError(f"override key {key!r} must be dotted names like 'bissl.lam'")
    return path, _parse_text(text, f"the value of override '{key}'") if text.strip() else ""


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` in the nested dict ``raw`` in place (validation happens later)."""
    path, value = parse_override(item)
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{'.'.join(path[: i + 1])}' is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML (or JSON, a YAML subset) config file, apply ``overrides``, validate.

    Args:
        path: the file; ``None`` starts from the defaults.
        overrides: ``"section.key=value"`` strings applied after the file.

    Raises:
        ConfigError: unreadable file, unknown key, bad type or value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read {path}: {err.strerror}") from None
        raw = _parse_text(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every key) as YAML."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    Path(path).write_text(text)


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict (a run's config.yaml, a sweep's base config) with the keys it lacks
    filled from the defaults: a key added to bissl after the run was made takes its default, so
    resuming that run is not refused as a config change unless the key is set otherwise."""

    def merge(default: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        out = dict(given)
        for key, value in default.items():
            if key not in given:
                out[key] = value
            elif isinstance(value, dict) and isinstance(given[key], dict) and key != "options":
                out[key] = merge(value, given[key])
        return out

    return merge(config_to_dict(Config()), saved)


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "options":
            out.extend(diff_configs(va, vb, path))
        elif va != vb:
            out.append(path)
    return out
