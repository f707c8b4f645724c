"""Per-rank memory and time of one BiSSL step at 1, 2 and 4 ranks under ZeRO 0-3 (CPU, gloo).

Run standalone (not a pytest benchmark: every configuration is its own torchrun job)::

    python benchmarks/bench_zero_memory.py                          # ResNet-50, ranks 1 2 4, stages 0-3
    python benchmarks/bench_zero_memory.py --ranks 2 --stages 3 --backbone small   # a quick check

Model: two ResNet-50 copies (θ with a SimCLR projector 2048-512-128, φ with a 10-way linear head;
23.5 M backbone parameters per copy, random weights: memory does not depend on them), LARS below
and SGD with momentum above (as the pipeline), CG with 5 iterations, the hypergradient sharded at
ZeRO-3 (the default). Each configuration runs the step of :mod:`bissl.trainer.bissl_step` — the one
the pipeline runs — once to warm up (optimizer states are created lazily), then one measured
lower step + upper step, each rank on its shard of the same global batch.

What is measured, per rank (MiB):

* ``model_and_optimizer``: bytes of all live tensor storages right before the measured step (found
  with ``gc``, deduplicated by storage): parameters, optimizer states, the gradients DeepSpeed
  keeps and its flat buffers and buckets, of both copies. Exact; this is what ZeRO shards.
* ``cg_state``: the solver's vectors (``b, x, r, p, Ap``: 5 vectors of the length the solve
  actually worked on, recorded from the run — ``P`` unsharded, the rank's partition ``≈ P/N``
  sharded) times the element size.
* ``persistent`` = ``model_and_optimizer + cg_state`` (the target: ≈ 1/N of the 1-rank figure
  at ZeRO-3).
* ``step_transient_rss``: peak resident set size during the measured step (``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus the RSS right before it: what the step adds at its worst
  moment — the gathered θ and activations of the HVP's graph, the CG vectors, gradients,
  communication buffers — plus allocator slack (glibc's mmap threshold is pinned so freed large
  blocks go back to the OS and RSS follows live memory). ``step_peak`` = ``model_and_optimizer +
  step_transient_rss``.
* ``step_seconds``: wall time of the measured lower + upper step (ranks share the 2 cores here,
  so times at N > 2 ranks mostly show oversubscription, not scaling).

Not included: what Python, torch and DeepSpeed themselves occupy (``library_baseline_rss``).
Results: ``benchmarks/results/zero_memory-cpu.json``; README table: ``benchmarks/make_tables.py``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MIB = 2.0**20
CG_VECTORS = 5  # b, x, r, p, Ap


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def live_tensor_bytes() -> int:
    """Bytes of all live, non-meta tensor storages reachable from Python objects (deduplicated)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                if storage.nbytes():
                    seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return sum(seen.values())


def _objectives(backbone: str):
    from bissl.distributed.testing import bilevel_objectives, toy_objectives
    from bissl.models import resnet50

    if backbone == "resnet50":
        torch.manual_seed(0)
        net = resnet50(small_input=True)
        return bilevel_objectives(net, net.out_dim, classes=10, proj_dims=(512, 128), gamma=1.0, seed=1)
    return toy_objectives(seed=0)


def worker(args: argparse.Namespace) -> None:
    """One rank: build, warm up, measure one step, write this rank's numbers."""
    import bissl.hypergrad.implicit as implicit
    from bissl.config import config_from_dict
    from bissl.distributed import DataParallel, OptimizerSpec, exit_rank, init_process_group_from_env
    from bissl.distributed.testing import step_data
    from bissl.hypergrad import HypergradSettings
    from bissl.hypergrad.lam_schedules import ConstantLam
    from bissl.trainer.bissl_step import BisslSettings, BisslStep

    info = init_process_group_from_env(timeout_s=1800)
    torch.set_num_threads(1)
    gc.collect()
    baseline = _rss_kib("VmRSS")
    section = config_from_dict({"deepspeed": {"zero_stage": args.stage}}).deepspeed
    dp = DataParallel(info.world_size, info.rank, section if args.stage >= 1 else None)
    lower, upper = _objectives(args.backbone)
    lo = dp.trainable(lower, OptimizerSpec("lars", 0.1, weight_decay=1e-6, clip_norm=10.0))
    up = dp.trainable(upper, OptimizerSpec("sgd", 0.01, weight_decay=1e-4, clip_norm=10.0))
    del lower, upper
    # on_indefinite="warn": the memory does not depend on the answer (a contrastive loss's Hessian
    # at a random initialisation is often indefinite, docs/method.md).
    hyper = HypergradSettings(iters=5, damping=args.damping, on_indefinite="warn", strict=False)
    settings = BisslSettings(hyper=hyper, shard=info.world_size > 1 and section.sharded_hypergrad)
    step = BisslStep(lo, up, settings, ConstantLam(1e-3), lambda: "benchmark step")
    solved: list[tuple[int, int]] = []
    real_solve = implicit._solve

    def recording_solve(name, matvec, v, *a, **kw):
        solved.append((v.numel(), v.element_size()))
        return real_solve(name, matvec, v, *a, **kw)

    implicit._solve = recording_solve
    image = (3, args.image, args.image) if args.backbone == "resnet50" else (1, 8, 8)
    classes = 10 if args.backbone == "resnet50" else 3

    def run(k: int) -> None:
        data = step_data(
            0, k, world=info.world_size, lower_steps=1, batch=args.batch * info.world_size, image=image, classes=classes
        )
        step.lower_step(data.lower[0][info.rank])
        step.upper_step(data.hvp[info.rank], data.upper[info.rank])

    run(0)  # warm-up: creates the optimizer states
    gc.collect()
    model_bytes = live_tensor_bytes()
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    run(1)
    seconds = time.perf_counter() - t0
    transient = (_rss_kib("VmHWM") - before) / 1024
    numel, itemsize = solved[-1]
    cg_bytes = CG_VECTORS * numel * itemsize
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for t in (lo, up) for p in t.module.parameters())
    row = {
        "rank": info.rank,
        "world_size": info.world_size,
        "zero_stage": args.stage,
        "sharded_hypergrad": settings.shard,
        "params_both_copies": n_params,
        "backbone_params": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in lo.module.backbone.parameters()
        ),
        "cg_vector_numel": numel,
        "model_and_optimizer_mib": model_bytes / MIB,
        "cg_state_mib": cg_bytes / MIB,
        "persistent_mib": (model_bytes + cg_bytes) / MIB,
        "step_transient_rss_mib": transient,
        "step_peak_mib": model_bytes / MIB + transient,
        "rss_before_step_mib": before / 1024,
        "library_baseline_rss_mib": baseline / 1024,
        "step_seconds": seconds,
    }
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(row))
    exit_rank(0)


def run_config(script: Path, ranks: int, stage: int, args: argparse.Namespace) -> list[dict]:
    from bissl.distributed import launch

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    with tempfile.TemporaryDirectory() as out:
        log = io.StringIO()
        code = launch(
            ranks,
            [
                str(script),
                "--worker",
                "--stage",
                str(stage),
                "--out",
                out,
                "--backbone",
                args.backbone,
                "--batch",
                str(args.batch),
                "--image",
                str(args.image),
                "--damping",
                str(args.damping),
            ],
            env=env,
            timeout_s=args.timeout,
            stream=log,
        )
        if code != 0:
            raise RuntimeError(f"ranks={ranks} stage={stage} failed (exit {code}):\n{log.getvalue()[-4000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--backbone", choices=("resnet50", "small"), default="resnet50")
    parser.add_argument("--batch", type=int, default=2, help="images per rank per batch")
    parser.add_argument("--image", type=int, default=16, help="image side (ResNet-50, small-input stem)")
    parser.add_argument("--damping", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", default=None, help="worker: result folder; driver: JSON path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(HERE))
    from conftest import machine  # the benchmarks' shared machine description

    rows = []
    for stage in args.stages:
        for ranks in args.ranks:
            got = run_config(Path(__file__).resolve(), ranks, stage, args)
            rows += got
            r0 = got[0]
            print(
                f"stage {stage} ranks {ranks}: model+opt {r0['model_and_optimizer_mib']:7.1f} + CG "
                f"{r0['cg_state_mib']:6.1f} = persistent {r0['persistent_mib']:7.1f} MiB; step peak "
                f"{r0['step_peak_mib']:7.1f} MiB; {r0['step_seconds']:.1f} s  [rank 0]",
                flush=True,
            )
    out = Path(args.out) if args.out else RESULTS / "zero_memory-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "backbone": args.backbone,
                "batch_per_rank": args.batch,
                "image": args.image,
                "cg_iters": 5,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
