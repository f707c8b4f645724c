"""Command line: ``bissl run | demo | config | env | sweep | report | bench`` (also ``python -m bissl``).

Examples::

    bissl demo                                   # baseline, compute-matched baseline, BiSSL on digits, 10 seeds
    bissl demo --task text                       # the same on two text tasks with a small GPT
    bissl run demo_digits --nproc 2              # every phase on 2 ranks (gloo; DeepSpeed ZeRO)
    bissl run demo_digits --set bissl.lam=0.01 --out runs/lam0.01
    bissl run my_config.yaml                     # any YAML/JSON file; bare names are packaged configs
    bissl run --resume runs/lam0.01              # continue a killed run from its last checkpoint
    bissl sweep demo_digits --grid bissl.lam=1e-3,1e-2 --seeds 3   # sensitivity
    bissl config reference_imagenet_resnet50     # print the resolved config
    bissl env                                    # versions, threads, kernel backends
    bissl report runs/demo_digits --per-seed     # markdown table with paired statistics
    bissl report --update README.md docs/*.md    # regenerate the docs' tables (make tables)
    bissl bench --model resnet18 --solver cg     # hypergradient throughput, ours vs the reference
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from bissl.bench_cli import register_bench_command
from bissl.config import ConfigError, config_to_dict, load_config
from bissl.configs import CONFIG_DIR, packaged_configs, resolve_config
from bissl.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED
from bissl.sweep.cli import register_sweep_command

#: The configs each ``bissl demo --task`` runs, one comparison (and one table) per config.
DEMO_CONFIGS = {
    "vision": ("demo_digits.yaml",),
    "text": ("demo_text_polarity.yaml", "demo_text_newsgroups.yaml", "demo_text_genre.yaml"),
}
DEMO_DESCRIPTIONS = {
    "vision": "scikit-learn digits (small CNN, SimCLR)",
    "text": "gensim's sentence polarity and newsgroup topics and Shakespeare genres (small GPT, next-token pretext)",
}


def _demo_config_path(name: str) -> Path:
    path = CONFIG_DIR / name
    if not path.exists():
        raise ConfigError(
            f"the demo config {path} is missing from this install (bissl ships it as "
            f"package data); run 'bissl run <config>' with a config file instead"
        )
    return path


def _run_dir(cfg, config_path: Path | None, out: str | None) -> Path:
    if out:
        return Path(out)
    name = cfg.run.name or (config_path.stem if config_path is not None else "run")
    return Path(cfg.run.out_dir) / name


def _execute(cfg, run_dir: Path, *, command_hint: str) -> int:
    """Run the experiment, print the table; map failures to exit statuses and one-line messages."""
    from bissl.solvers import SolverError
    from bissl.trainer import (
        DistributedRunError,
        NonFiniteLossError,
        RunInterrupted,
        format_table,
        run_experiment,
    )

    state = "resuming" if (run_dir / "config.yaml").exists() else "new run"
    print(f"run directory: {run_dir} ({state})", flush=True)
    start = time.perf_counter()
    try:
        results = run_experiment(cfg, run_dir)
    except (NonFiniteLossError, SolverError, DistributedRunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, RunInterrupted) as err:
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
        print(f"\n{reason}; resume with: {command_hint} --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    wall = time.perf_counter() - start
    print()
    print(
        f"test top-1 accuracy (%) on {results['dataset']} ({results['backbone']}, "
        f"{results['pretext']}), seeds {results['seeds']}:"
    )
    print(format_table(results))
    if results.get("nproc", 1) > 1:
        layout = f"{results['nproc']} ranks"
    elif results["workers"] > 1:
        layout = f"{results['workers']} worker processes"
    else:
        layout = "1 process"
    threads = results["threads"] if results["threads"] is not None else "torch's default"
    print(f"\nwall time {wall:.1f} s on {results['device']} ({layout}, {threads} thread(s) each)")
    print(
        f"results: {run_dir / 'results.json'}\ncurves:  {run_dir / 'curves.png'}\n"
        f"metrics: {run_dir}/seed_<s>/metrics.csv"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set) + (["run.quiet=true"] if args.quiet else [])
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        overrides.append(f"run.nproc={args.nproc}")
    resume_dir = Path(args.resume) if isinstance(args.resume, str) else None
    config_path = resolve_config(args.config) if args.config else None
    if config_path is None:
        if resume_dir is None:
            raise ConfigError("give a CONFIG file, or --resume RUN_DIR to continue a run")
        config_path = resume_dir / "config.yaml"
        if not config_path.exists():
            raise ConfigError(f"{resume_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config_path, overrides)
    run_dir = resume_dir or _run_dir(cfg, config_path, args.out)
    if args.resume is not None and not (run_dir / "config.yaml").exists():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
    return _execute(cfg, run_dir, command_hint="bissl run")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    overrides = ([f"run.seeds={list(range(args.seeds))}"] if args.seeds is not None else []) + list(args.set)
    if args.quiet:
        overrides.append("run.quiet=true")
    names = DEMO_CONFIGS[args.task]
    # Validate every config before the first (minutes-long) run starts.
    paths = [_demo_config_path(name) for name in names]
    cfgs = [load_config(path, overrides) for path in paths]
    seeds = sorted({len(cfg.run.seeds) for cfg in cfgs})
    from bissl.report_tables import ARM_NAMES
    from bissl.trainer.report import ARMS, configured_arms

    arms = [a for a in ARMS if any(a in configured_arms(cfg) for cfg in cfgs)]
    print(
        f"BiSSL demo: {', '.join(ARM_NAMES[a] for a in arms)} on {DEMO_DESCRIPTIONS[args.task]}, "
        f"{' / '.join(map(str, seeds))} seed(s)"
    )
    hint = f"bissl demo --task {args.task}" + (f" --seeds {args.seeds}" if args.seeds is not None else "")
    for path, cfg in zip(paths, cfgs):
        out = str(Path(args.out) / path.stem) if args.out and len(paths) > 1 else args.out
        print(f"\n== {path.stem} (config {path})")
        status = _execute(cfg, _run_dir(cfg, path, out), command_hint=hint)
        if status:
            return status
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_config(args.config) if args.config else None, args.set)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bissl.report_tables import (
        TableError,
        check_files,
        count_blocks,
        kind_of,
        render,
        update_files,
    )

    try:
        if args.update or args.check:
            files = args.update or args.check
            if args.run_dirs or args.out:
                raise ConfigError("--update/--check take markdown files; give run directories without them")
            if args.check:
                stale = check_files(files)
                for path in stale:
                    print(f"{path}: a generated table differs from its data; run 'make tables'", file=sys.stderr)
                print(f"{count_blocks(files)} table(s) in {len(files)} file(s) checked, {len(stale)} file(s) stale")
                return EXIT_FAILED if stale else 0
            changed = update_files(files)
            print(
                f"{count_blocks(files)} table(s) in {len(files)} file(s); rewrote: "
                f"{', '.join(changed) if changed else 'nothing (all up to date)'}"
            )
            return 0
        if not args.run_dirs:
            raise ConfigError("give RUN_DIR(s), or --update/--check FILE(s)")
        options = {k: v for k, v in (("metric", args.metric), ("compare", args.compare)) if v}
        tables = []
        for run_dir in args.run_dirs:
            kind = kind_of(run_dir)
            if kind == "run" and args.per_seed:
                options["per_seed"] = "yes"
            tables.append(
                render(kind, run_dir, options={k: v for k, v in options.items() if kind == "run" or k != "per_seed"})
            )
    except TableError as err:
        raise ConfigError(str(err)) from None
    text = "\n\n".join(tables) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    import torch

    import bissl
    import bissl.ops

    print(f"bissl     {getattr(bissl, '__version__', 'unknown')} ({Path(bissl.__file__).parent})")
    print(f"python    {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch     {torch.__version__}")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError as err:
        print(f"triton    not importable ({err})")
    print(f"threads   intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}")
    print(
        f"cpu       mkldnn {torch.backends.mkldnn.is_available()}, capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda      {torch.version.cuda}: {names}")
    else:
        print("cuda      not available")
    report = getattr(bissl.ops, "backend_report", None)
    if callable(report):
        text = report()
        print("backends:")
        print(text if isinstance(text, str) else yaml.safe_dump(text, sort_keys=False), end="")
        print()
    else:
        print("backends: bissl.ops.backend_report() is not available in this build")
    from bissl.extras import EXTRAS, describe_missing

    print("extras:")
    for extra in sorted(EXTRAS):
        print(f"  {extra:<12} {describe_missing(extra) or 'installed'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bissl",
        description="BiSSL: bilevel optimization aligning self-supervised pretraining with "
        "downstream fine-tuning (pretext -> BiSSL -> fine-tune, vs a baseline).",
        epilog="Run 'bissl <command> --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            metavar="KEY=VALUE",
            action="append",
            default=[],
            help="override a config key, e.g. --set bissl.lam=0.01 (repeatable; values are YAML: 1e-3, true, [0, 1])",
        )

    run = sub.add_parser(
        "run",
        help="run (or resume) the full pipeline from a config file",
        description="Run pretext pretraining, the BiSSL stage and fine-tuning of "
        "both arms for every seed; resumes automatically when the run "
        "directory already holds checkpoints.",
    )
    run.add_argument(
        "config",
        nargs="?",
        help="YAML/JSON config file, or the name of a packaged config "
        f"({', '.join(packaged_configs())}); optional with "
        "--resume RUN_DIR",
    )
    add_set(run)
    run.add_argument("--out", metavar="DIR", help="run directory (default: run.out_dir/<config name>)")
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (default: the config's run directory) from "
        "its last checkpoint; the directory must exist",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="ranks (sets run.nproc): N > 1 runs the BiSSL stage data-parallel under "
        "DeepSpeed ZeRO (config section 'deepspeed'), gloo on 127.0.0.1 on CPU",
    )
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo",
        help="baseline vs BiSSL on built-in data (CPU, minutes)",
        description="The whole comparison on built-in data, ending in a table of "
        "test accuracies: scikit-learn's 8x8 digits with a small CNN "
        "(--task vision), or three labelled text sets (gensim's "
        "test data, Shakespeare's plays) with a small GPT "
        "(--task text).",
    )
    demo.add_argument(
        "--task",
        choices=sorted(DEMO_CONFIGS),
        default="vision",
        help="'vision' (digits, default) or 'text' (three text classification tasks, one table each)",
    )
    demo.add_argument(
        "--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the config's; digits: 10)"
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/<config name>; with several configs: DIR/<config name>)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    add_set(demo)
    demo.set_defaults(func=_cmd_demo)

    config = sub.add_parser("config", help="print the fully resolved config (validates it)")
    config.add_argument(
        "config", nargs="?", help="YAML/JSON config file or packaged config name (default: the built-in defaults)"
    )
    add_set(config)
    config.set_defaults(func=_cmd_config)

    report = sub.add_parser(
        "report",
        help="results tables (markdown) from run/sweep directories; rewrite the docs' marked tables",
        description="Print the markdown table of each RUN_DIR (results.json of 'bissl run', or "
        "sweep.csv of 'bissl sweep'): mean ± std per arm, paired differences with "
        "bootstrap intervals, t / Wilcoxon / McNemar p-values, Holm across sweep "
        "cells. --update rewrites every '<!-- table:KIND PATH -->' block of the given "
        "markdown files ('make tables'); --check only reports stale ones.",
    )
    report.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run or sweep directories")
    report.add_argument("--out", metavar="FILE", help="write the tables to FILE instead of stdout")
    report.add_argument(
        "--metric",
        choices=("test_acc", "val_acc", "test_loss", "val_loss"),
        help="metric to tabulate (default: test_acc)",
    )
    report.add_argument("--per-seed", action="store_true", help="run tables: one row per seed too")
    report.add_argument(
        "--compare", metavar="A-B,...", help="arm pairs to compare (default: bissl against every other arm)"
    )
    report.add_argument("--update", nargs="+", metavar="FILE", help="rewrite the marked tables of these markdown files")
    report.add_argument(
        "--check", nargs="+", metavar="FILE", help="exit 1 if a marked table of these files differs from its data"
    )
    report.set_defaults(func=_cmd_report)

    env = sub.add_parser("env", help="print versions, threads and the kernel backends")
    env.set_defaults(func=_cmd_env)

    register_sweep_command(sub)
    register_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bissl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG
