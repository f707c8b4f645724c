"""The ``bissl sweep`` subcommand: :func:`register_sweep_command` adds it to ``bissl``'s parser.

This module imports only argparse and the config at load time (``bissl --help`` stays fast); the
runner is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bissl.config import ConfigError
from bissl.configs import resolve_config

EXAMPLES = """\
examples:
  bissl sweep demo_digits --grid bissl.lam=1e-3,1e-2,1e-1 --seeds 3
  bissl sweep demo_digits --grid bissl.lam=1e-3,1e-2 \\
      --grid bissl.solver=cg,identity --set bissl.stages=10 --out runs/lam_solver
  bissl sweep --resume runs/lam_solver       # continue (finished cells are not rerun)
  bissl sweep demo_digits --axis bissl.gamma=0.01 --axis bissl.stages=5,20
      # one factor at a time: the config as it is (cell 'base'), gamma=0.01,
      # stages=5 and stages=20, each with every other key at its base value

Values are YAML like --set (1e-3 is a number, cg a string; lists in brackets:
--grid pretext.projector_dims=[16,16,8],[32,32,8]). Cells run in order, each in
<out>/cells/<name>/; the results land in <out>/sweep.csv, <out>/summary.csv and
<out>/sensitivity.png. When only bissl.* keys are swept, the pretext phase and the
baseline arm run once per seed (in the first cell) and every cell reuses them.
See docs/sweeps.md."""


def register_sweep_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sweep`` to an ``add_subparsers()`` object; returns the new parser.

    The parser's ``func`` default is :func:`cmd_sweep` (``args.func(args)`` -> exit status), the
    convention of :func:`bissl.cli.build_parser`; it raises ConfigError for bad usage.
    """
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of configs; CSVs and sensitivity plots (resumable)",
        description="Run every combination of the --grid values (all seeds, BiSSL and baseline),\n"
        "skip cells that finished earlier, collect the final metrics into CSVs and\n"
        "plot test accuracy against each swept key.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML/JSON base config file or packaged config name (not with --resume)")
    p.add_argument(
        "--grid",
        metavar="KEY=V1,V2,...",
        action="append",
        default=[],
        help="a swept key and its values (repeatable: the cells are the Cartesian "
        "product, the first --grid varying slowest)",
    )
    p.add_argument(
        "--axis",
        metavar="KEY=V1,V2,...",
        action="append",
        default=[],
        help="a key varied one factor at a time (repeatable, not with --grid): the cells are "
        "the config unchanged ('base') and one per other value of each --axis, every other "
        "key at its base value",
    )
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="fix a config key in every cell, e.g. --set bissl.stages=10 (repeatable)",
    )
    p.add_argument(
        "--seeds", type=int, metavar="N", help="run seeds 0..N-1 in every cell (default: the config's run.seeds)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="sweep directory (default: <run.out_dir>/sweep_<config name>); an existing "
        "sweep of the same grid there is continued, a different one refused",
    )
    p.add_argument(
        "--resume",
        metavar="SWEEP_DIR",
        help="continue the sweep in SWEEP_DIR (config, grid and seeds from its sweep.json)",
    )
    p.add_argument(
        "--no-share",
        action="store_true",
        help="run the pretext phase and the baseline arm in every cell, even when the swept keys cannot change them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run ``bissl sweep``; returns the exit status (0, or bissl.cli's failed/interrupted codes)."""
    from bissl.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED
    from bissl.sweep.grid import parse_grid_args
    from bissl.sweep.runner import default_out, resume_sweep, run_sweep
    from bissl.trainer import RunInterrupted

    extra = ["run.quiet=true"] if args.quiet else []
    if args.resume:
        given = [
            name
            for name, value in (
                ("CONFIG", args.config),
                ("--grid", args.grid),
                ("--axis", args.axis),
                ("--set", args.set),
                ("--seeds", args.seeds),
                ("--out", args.out),
                ("--no-share", args.no_share),
            )
            if value
        ]
        if given:
            raise ConfigError(
                f"--resume takes the config, grid and seeds from SWEEP_DIR/sweep.json; drop {', '.join(given)}"
            )
        out = args.resume

        def run() -> Any:
            return resume_sweep(out, overrides=extra)
    else:
        if args.grid and args.axis:
            raise ConfigError("give --grid (every combination) or --axis (one factor at a time), not both")
        if not args.config or not (args.grid or args.axis):
            raise ConfigError(
                "give a CONFIG file and at least one --grid KEY=V1,V2,... or --axis KEY=V1,V2,... "
                "(or --resume SWEEP_DIR)"
            )
        design = "axes" if args.axis else "grid"
        grid = parse_grid_args(args.axis, "--axis") if args.axis else parse_grid_args(args.grid)
        config = resolve_config(args.config)
        out = args.out or default_out(config, args.set)

        def run() -> Any:
            return run_sweep(
                config,
                grid,
                seeds=args.seeds,
                out=out,
                overrides=[*args.set, *extra],
                share=not args.no_share,
                design=design,
            )

    try:
        result = run()
    except (KeyboardInterrupt, RunInterrupted) as err:
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
        print(f"\n{reason}; continue with: bissl sweep --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"\nper run:     {result.csv_path}\nper cell:    {result.summary_path}\nsensitivity: {result.plot_path}")
    if result.failed:
        names = ", ".join(o.cell.name for o in result.failed)
        print(
            f"{len(result.failed)} cell(s) failed: {names} (see the error column of {result.summary_path.name})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0
