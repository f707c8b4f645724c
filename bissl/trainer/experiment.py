"""The whole comparison for every seed: pretext -> BiSSL -> fine-tune, and the baseline arm,
in this process: a single-process run, or one rank of a multi-rank run (every rank runs every
phase on its shards; rank 0 writes the outputs).

Run directory layout::

    <run_dir>/config.yaml            the fully resolved config
    <run_dir>/results.json           per-seed and mean ± std accuracies of both arms
    <run_dir>/curves.png             pretext / lower / upper losses, fine-tuning val accuracy
    <run_dir>/seed_<s>/metrics.csv   one row per logged step (see bissl.trainer.metrics)
    <run_dir>/seed_<s>/checkpoints/  <phase>.pt (in progress), <phase>.done.pt (finished)

Per seed the phases are ``pretext``, ``bissl``, ``finetune_bissl`` (arm ``bissl``), then with the
baseline enabled ``finetune_baseline`` (arm ``baseline``), with ``baseline.compute_matched``
``pretext_matched`` and ``finetune_baseline_matched`` (arm ``baseline_matched``: as many pretext
steps on θ as BiSSL's lower level takes), and with ``baseline.ablation_upper0`` ``bissl_upper0`` and
``finetune_bissl_upper0`` (arm ``bissl_upper0``: BiSSL's lower steps without any upper step). The
pretext checkpoint is shared by every arm. Running the same command again on the same run directory
resumes from the last checkpoint (or just re-reports a finished run). :func:`run_experiment`
(``bissl.trainer.runner``) starts N rank processes first when ``run.nproc > 1``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from bissl.config import (
    Config,
    ConfigError,
    DebugConfig,
    config_from_dict,
    config_to_dict,
    diff_configs,
    dump_config,
    with_defaults,
)
from bissl.data import load_dataset
from bissl.data.options import image_task_options, seed_split, text_task_options
from bissl.distributed.trainable import DataParallel
from bissl.provenance import collect_provenance
from bissl.trainer.bissl_phase import BisslPhase
from bissl.trainer.bissl_stage import lower_spec
from bissl.trainer.builders import PipelineData
from bissl.trainer.checkpoint import load_checkpoint
from bissl.trainer.finetune_phase import FinetunePhase
from bissl.trainer.loop import RunContext, StepBudget, run_phase
from bissl.trainer.metrics import MetricsLog, NullMetrics, progress_enabled
from bissl.trainer.plots import plot_run_dir
from bissl.trainer.pretext_phase import PretextPhase
from bissl.trainer.report import ARMS, METRICS, bissl_diagnostics, summarize, write_json_atomic

#: Keys that may change between a run and its resumption (they do not change the results).
RESUMABLE_CHANGES = (
    "run.name",
    "run.out_dir",
    "run.quiet",
    "run.seeds",
    "run.checkpoint_every",
    "run.num_threads",
    "run.workers",
    "run.device",
    "run.log_every",
)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a requested CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'run.device' is {name!r} but CUDA is not available (use 'cpu' or 'auto')")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"'run.device' is {name!r} but MPS is not available")
    return device


def threads_per_process(cfg: Config) -> int | None:
    """``run.num_threads``, or with several workers the cores shared out among them."""
    if cfg.run.num_threads is not None:
        return cfg.run.num_threads
    workers = min(cfg.run.workers, len(cfg.run.seeds))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


def configure_torch(cfg: Config) -> None:
    """Threads, default dtype, cuDNN autotuning and deterministic algorithms, as configured."""
    threads = threads_per_process(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_default_dtype(getattr(torch, cfg.run.dtype))
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)


def tokenizer_path(cfg: Config, run_dir: str | Path, seed: int | None = None) -> Path:
    """Where a text run keeps its tokenizer: ``<run_dir>/tokenizer.json``, or, when each seed has
    its own split (``data.fold_by_seed``) and the pretext corpus is that split's training texts,
    ``<run_dir>/seed_<seed>/tokenizer.json``."""
    if cfg.data.fold_by_seed and cfg.data.pretext_name is None:
        return Path(run_dir) / f"seed_{seed or 0}" / "tokenizer.json"
    return Path(run_dir) / "tokenizer.json"


def load_pipeline_data(cfg: Config, run_dir: str | Path | None = None, seed: int | None = None) -> PipelineData:
    """Load the downstream (and optional separate pretext) dataset named by ``cfg.data``.

    Text runs (``task: text``) tokenise with the tokenizer saved at :func:`tokenizer_path` when it
    exists; otherwise one is trained on the pretext corpus and saved there (kept in memory only
    when ``run_dir`` is None). Training is deterministic, so every process of a run gets the same
    tokenizer either way. ``seed`` matters only under ``data.fold_by_seed`` (each seed its fold).
    """
    d = cfg.data
    try:
        if cfg.task == "text":
            from bissl.data.text import load_text_data

            t = cfg.text
            text = load_text_data(
                d.name,
                pretext_name=d.pretext_name,
                tokenizer=t.tokenizer,
                vocab_size=t.vocab_size,
                seq_len=t.seq_len,
                max_length=t.max_length,
                val_fraction=d.val_fraction,
                test_fraction=d.test_fraction,
                **text_task_options(d, seed),
                tokenizer_path=None if run_dir is None else tokenizer_path(cfg, run_dir, seed),
            )
            return PipelineData.from_text(text)
        down = load_dataset(
            d.name,
            root=d.root,
            image_size=d.image_size,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            seed=d.split_seed,
            **image_task_options(d),
        )
        pretext = None
        if d.pretext_name is not None:
            # A separate pretext set is unlabelled training data: nothing is held out of it.
            pretext = load_dataset(
                d.pretext_name,
                root=d.pretext_root,
                val_fraction=0.0,
                test_fraction=0.0,
                seed=d.split_seed,
                image_size=d.image_size or down.image_size,
            )
        return PipelineData.from_splits(down, pretext).to_dtype(getattr(torch, cfg.run.dtype))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"'data': {err}") from None


def prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Create ``run_dir`` with the resolved config, or check that an existing run used the same one.

    Returns:
        True when an existing run directory is being resumed.

    Raises:
        ConfigError: the directory holds a run with a different config (outside
            :data:`RESUMABLE_CHANGES` and the ``debug`` section).
    """
    saved_path = run_dir / "config.yaml"
    resuming = saved_path.exists()
    if resuming:
        saved = with_defaults(yaml.safe_load(saved_path.read_text()) or {})
        current = config_to_dict(cfg)
        changed = [k for k in diff_configs(saved, current) if k not in RESUMABLE_CHANGES and not k.startswith("debug.")]
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(changed[:4])}"
                f"{' ...' if len(changed) > 4 else ''} differ); resume with the same "
                "config or choose another output directory"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    # One temporary name per process: every rank of a distributed run writes this same file, and a
    # shared name let one rank's rename take the other's file from under it (FileNotFoundError).
    tmp = run_dir / f".config.yaml.tmp{os.getpid()}"
    # Fault injection belongs to one process, not to the run: `bissl run --resume DIR` reads this file.
    dump_config(dataclasses.replace(cfg, debug=DebugConfig()), tmp)
    os.replace(tmp, saved_path)
    return resuming


def _arm_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """An arm's final metrics and its per-example test predictions and correctness (0/1, in test
    order: paired statistics such as McNemar's test read them)."""
    out: dict[str, Any] = {k: float(result[k]) for k in METRICS}
    for key in ("test_pred", "test_correct"):
        if key in result:
            out[key] = [int(v) for v in result[key]]
    return out


def run_seed(
    cfg: Config,
    data: PipelineData,
    seed: int,
    seed_dir: Path,
    device: torch.device,
    budget: StepBudget,
    bar_position: int = 0,
    dp: DataParallel | None = None,
) -> dict[str, dict[str, Any] | None]:
    """All phases of one seed; returns ``{arm: metrics}`` with ``"bissl"`` and ``"baseline"`` (None
    when disabled), plus ``"baseline_matched"`` / ``"bissl_upper0"`` when configured, the text
    probes ``"majority"`` / ``"bag_of_tokens"`` (``text.probes``), ``"split"`` (k-fold runs: the
    seed's ``split_seed``, ``fold``, ``folds`` and test size) and ``"diagnostics"`` (rank 0:
    :func:`bissl.trainer.report.bissl_diagnostics` of the BiSSL stage).

    Every rank of a multi-rank run calls it (``dp``); only rank 0 writes the metrics file.
    """
    dp = dp or DataParallel()
    metrics = MetricsLog(seed_dir / "metrics.csv") if dp.rank == 0 else NullMetrics()
    ctx = RunContext(
        seed=seed,
        device=device,
        ckpt_dir=seed_dir / "checkpoints",
        metrics=metrics,
        checkpoint_every=cfg.run.checkpoint_every,
        log_every=cfg.run.log_every,
        progress=progress_enabled(cfg.run.quiet) and dp.rank == 0,
        budget=budget,
        bar_position=bar_position,
        dp=dp,
    )

    def finetune(arm: str, backbone: dict[str, Any]) -> dict[str, Any]:
        phase = f"finetune_{arm}"
        return _arm_metrics(run_phase(phase, lambda: FinetunePhase(phase, cfg, data, ctx, backbone), ctx))

    out: dict[str, Any] = {}
    if cfg.task == "text" and cfg.text.probes and dp.rank == 0:
        from bissl.tasks.probes import text_probes

        out.update(text_probes(data))  # deterministic and cheap: recomputed when a seed resumes
    if cfg.data.folds is not None:
        split_seed, fold = seed_split(cfg.data, seed)
        out["split"] = {"split_seed": split_seed, "fold": fold, "folds": cfg.data.folds, "test_n": len(data.test_y)}
    try:
        pre = run_phase("pretext", lambda: PretextPhase("pretext", cfg, data, ctx), ctx)
        bissl = run_phase("bissl", lambda: BisslPhase(cfg, data, ctx, pre, dp), ctx)
        out["bissl"] = finetune("bissl", bissl["lower_backbone"])
        out["baseline"] = finetune("baseline", pre["backbone"]) if cfg.baseline.enabled else None
        if cfg.baseline.enabled and cfg.baseline.compute_matched:
            b, lo = cfg.bissl, cfg.bissl.lower
            matched = run_phase(
                "pretext_matched",
                lambda: PretextPhase(
                    "pretext_matched",
                    cfg,
                    data,
                    ctx,
                    total_steps=b.stages * b.lower_steps,
                    opt=lower_spec(cfg),
                    warmup_steps=lo.warmup_steps,
                    final_lr_factor=lo.final_lr_factor,
                    batch_size=lo.batch_size,
                    init=pre,
                ),
                ctx,
            )
            out["baseline_matched"] = finetune("baseline_matched", matched["backbone"])
        if cfg.baseline.enabled and cfg.baseline.ablation_upper0:
            cfg0 = dataclasses.replace(cfg, bissl=dataclasses.replace(cfg.bissl, upper_steps=0))
            upper0 = run_phase("bissl_upper0", lambda: BisslPhase(cfg0, data, ctx, pre, dp, name="bissl_upper0"), ctx)
            out["bissl_upper0"] = finetune("bissl_upper0", upper0["lower_backbone"])
    finally:
        metrics.close()
    if dp.rank == 0:
        out["diagnostics"] = bissl_diagnostics(seed_dir / "metrics.csv")
    return out


def _seed_worker(
    raw_cfg: dict[str, Any], run_dir: str, seed: int, bar_position: int
) -> dict[str, dict[str, Any] | None]:
    """One seed in a worker process (spawned: nothing is inherited but the arguments)."""
    cfg = config_from_dict(raw_cfg)
    configure_torch(cfg)
    budget = StepBudget(cfg.debug.stop_after_steps, cfg.debug.stop_mode)
    return run_seed(
        cfg,
        load_pipeline_data(cfg, run_dir, seed),
        seed,
        Path(run_dir) / f"seed_{seed}",
        resolve_device(cfg.run.device),
        budget,
        bar_position,
    )


def _run_seeds_in_workers(cfg: Config, run_dir: Path, workers: int) -> dict[int, Any]:
    """Seeds shared among ``workers`` spawned processes; each seed writes only its own folder."""
    raw = config_to_dict(cfg)
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {seed: pool.submit(_seed_worker, raw, str(run_dir), seed, i) for i, seed in enumerate(cfg.run.seeds)}
        return {seed: future.result() for seed, future in futures.items()}


def _write_outputs(cfg: Config, run_dir: Path, per_seed: dict[int, Any], meta: dict[str, Any]) -> dict[str, Any]:
    # Machine, commit and date: the generated tables (bissl report) print them under every table.
    meta = {**meta, "provenance": collect_provenance(None if cfg.run.device == "cpu" else cfg.run.device)}
    results = summarize(per_seed, meta=meta)
    write_json_atomic(results, run_dir / "results.json")
    plot_run_dir(run_dir, cfg.run.seeds)
    return results


def summarize_done(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """results.json and curves.png of a run whose seeds have all finished (e.g. by several
    concurrent jobs), from the fine-tuning phases' ``.done.pt`` files; returns the results."""
    run_dir = Path(run_dir)
    prepare_run_dir(cfg, run_dir)
    per_seed: dict[int, Any] = {}
    for seed in cfg.run.seeds:
        ckpts = run_dir / f"seed_{seed}" / "checkpoints"
        arms: dict[str, Any] = {"bissl": None, "baseline": None}
        for arm in ARMS:
            done = ckpts / f"finetune_{arm}.done.pt"
            if done.exists():
                arms[arm] = _arm_metrics(load_checkpoint(done)["result"])
        if arms["bissl"] is None:
            raise RuntimeError(f"seed {seed} of {run_dir} has not finished (no finetune_bissl.done.pt)")
        arms["diagnostics"] = bissl_diagnostics(run_dir / f"seed_{seed}" / "metrics.csv")
        per_seed[seed] = arms
    meta = {
        "dataset": cfg.data.name,
        "backbone": cfg.model.backbone,
        "pretext": cfg.pretext.method,
        "device": cfg.run.device,
        "threads": cfg.run.num_threads,  # each rank's setting (None: torch's default)
        "workers": cfg.run.workers,
        "nproc": cfg.run.nproc,
        "zero_stage": cfg.deepspeed.zero_stage if cfg.run.nproc > 1 else None,
    }
    return _write_outputs(cfg, run_dir, per_seed, meta)


def _load_rank0_first(cfg: Config, run_dir: Path, seed: int | None, dp: DataParallel) -> PipelineData:
    """Rank 0 loads first (training and saving a text run's tokenizer); the others then read it."""
    data = load_pipeline_data(cfg, run_dir, seed) if dp.rank == 0 else None
    if dp.world > 1:
        import torch.distributed as dist

        dist.barrier()
        data = data or load_pipeline_data(cfg, run_dir, seed)
    assert data is not None  # rank 0 loaded it (the only rank of a one-process run)
    return data


def run_here(
    cfg: Config, run_dir: str | Path, *, dp: DataParallel | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Run (or resume) every seed of ``cfg`` in this process; write results.json and curves.png.

    Seeds run one after another, or (single process only) in ``run.workers`` parallel processes.
    A seed's results do not depend on which process ran it (only on the threads per process,
    which change floating-point summation order).

    Args:
        cfg: the experiment config.
        run_dir: the run directory.
        dp: this process's place in a multi-rank run (default: a single process); rank 0 writes
            every output, the other ranks compute with it.
        device: this rank's device (default: ``run.device``).

    Returns:
        The ``results.json`` content (see :func:`bissl.trainer.report.summarize`).
    """
    dp = dp or DataParallel()
    run_dir = Path(run_dir)
    start = time.perf_counter()
    device = device or resolve_device(cfg.run.device)
    configure_torch(cfg)
    if dp.rank == 0:
        prepare_run_dir(cfg, run_dir)
    workers = min(cfg.run.workers, len(cfg.run.seeds)) if dp.world == 1 else 1
    if workers > 1:
        # Fail here, once, on a data error (and save a shared tokenizer before the workers start).
        load_pipeline_data(cfg, run_dir, cfg.run.seeds[0])
        per_seed = _run_seeds_in_workers(cfg, run_dir, workers)
    else:
        stops_here = cfg.debug.stop_rank is None or cfg.debug.stop_rank == dp.rank
        budget = StepBudget(cfg.debug.stop_after_steps if stops_here else None, cfg.debug.stop_mode)
        shared = None if cfg.data.fold_by_seed else _load_rank0_first(cfg, run_dir, None, dp)
        per_seed = {
            seed: run_seed(
                cfg,
                shared or _load_rank0_first(cfg, run_dir, seed, dp),
                seed,
                run_dir / f"seed_{seed}",
                device,
                budget,
                dp=dp,
            )
            for seed in cfg.run.seeds
        }
    meta = {
        "dataset": cfg.data.name,
        "backbone": cfg.model.backbone,
        "pretext": cfg.pretext.method,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "workers": workers,
        "nproc": dp.world,
        "zero_stage": cfg.deepspeed.zero_stage if dp.world > 1 else None,
        "wall_s_this_process": round(time.perf_counter() - start, 1),
    }
    if dp.rank == 0:
        return _write_outputs(cfg, run_dir, per_seed, meta)
    return summarize(per_seed, meta=meta)
