"""``bissl bench``'s command line, kept apart from :mod:`bissl.bench` so that building the parser
(``bissl --help``, ``bissl config``) does not import torch."""

from __future__ import annotations

import argparse


def _bench(args: argparse.Namespace) -> int:
    from bissl.bench import bench_command

    return bench_command(args)


def register_bench_command(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``bissl`` command line."""
    p = sub.add_parser(
        "bench",
        help="hypergradient throughput on a model: ours vs the reference loop",
        description="Time one gradient, each HVP mode and the hypergradient (ours vs a faithful "
        "re-implementation of the BiSSL authors' loop) in interleaved rounds; print a "
        "report and write JSON.",
    )
    p.add_argument(
        "--model",
        default="resnet18",
        help="resnet18, small_cnn, gpt, or module:factory for your own model (default: resnet18)",
    )
    p.add_argument("--batch", type=int, default=16, help="batch size of each loss (default: 16)")
    p.add_argument("--solver", default="cg", help="cg, cg_layerwise, minres, neumann or identity (default: cg)")
    p.add_argument("--iters", type=int, default=5, help="solver iterations (default: 5)")
    p.add_argument(
        "--hvp-mode",
        default="revrev,fwdrev,autograd",
        help="comma-separated HVP modes to time; the first is the hypergradient's (default: revrev,fwdrev,autograd)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="default: float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--lam", type=float, default=1e-3, help="proximal weight λ (default: 1e-3)")
    p.add_argument("--damping", type=float, default=10.0, help="extra damping of the system (default: 10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--image", default="3x32x32", help="image shape CxHxW of image models (default: 3x32x32)")
    p.add_argument("--seq", type=int, default=64, help="sequence length of --model gpt (default: 64)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary of --model gpt (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default: 0)")
    p.add_argument("--skip-reference", action="store_true", help="time ours only")
    p.add_argument("--out", default="bissl_bench.json", help="JSON output (default: bissl_bench.json)")
    p.add_argument("--compare", metavar="OLD.json", help="print the change against an earlier result")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)
