"""Per-rank memory of a BiSSL step under DeepSpeed ZeRO 0-3 at 1 and 2 ranks (CPU, gloo).

Run standalone (not a pytest benchmark: every configuration is its own torchrun job)::

    python benchmarks/bench_zero_memory.py                   # ResNet-18, ranks 1 2, stages 0-3
    python benchmarks/bench_zero_memory.py --ranks 2 --stages 3 --backbone small

Model: two ResNet-18 copies (θ with a SimCLR projector 512-512-128, φ with a 10-way linear head;
11.2 M backbone parameters per copy), SGD with momentum in both engines, CG with 5 iterations.
Each rank runs one warm-up BiSSL step (optimizer states are created lazily by the first step),
then one measured step (1 lower step + 1 upper step).

What is measured, per rank (MiB):

* ``persistent_tensors``: bytes of all live tensor storages right before the measured step (found
  with ``gc``, deduplicated by storage): parameters, optimizer states, gradients DeepSpeed keeps,
  and DeepSpeed's flat buffers and buckets, of both copies. Exact; this is the part ZeRO shards.
* ``step_transient_rss``: peak resident set size during the measured step (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each phase: φ snapshot, lower step, hypergradient, upper engine
  step; ``phase_transient_rss`` has each) minus the RSS right before the step: what the step adds at
  its worst moment — gathered θ and the φ snapshot (ZeRO-3), v and the CG vectors, the HVP's
  first-order graph, activations, gradients, communication buffers — plus allocator slack.
  glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_=131072``) so freed large blocks go
  back to the OS and RSS follows live memory; treat it as an upper bound with a few MiB of noise.
* ``step_peak`` = ``persistent_tensors + step_transient_rss``.

Not included: what Python, torch and DeepSpeed themselves occupy (``library_baseline_rss``, a few
hundred MiB per process). This is CPU memory; on GPUs the same accounting applies to device
memory, plus NCCL's buffers.
Results: ``benchmarks/results/zero_memory-cpu.json``.
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


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def live_tensor_bytes() -> int:
    """Bytes of all live, non-meta tensor storages reachable from Python objects (deduplicated)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.nbytes():
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _build(backbone: str, stage: int):
    from bissl.distributed import DeepSpeedSettings, build_bilevel_engines
    from bissl.distributed.testing import bilevel_objectives, sgd_factory, toy_objectives
    from bissl.models import resnet18

    if backbone == "resnet18":
        torch.manual_seed(0)
        net = resnet18(small_input=True)
        lower, upper = bilevel_objectives(net, net.out_dim, classes=10, proj_dims=(512, 128), lam=1e-3,
                                          gamma=1.0, seed=1)
    else:
        lower, upper = toy_objectives(seed=0)
    sgd = sgd_factory(lr=0.01)
    settings = DeepSpeedSettings(zero_stage=stage)
    engines = build_bilevel_engines(lower, upper, lower_optimizer=sgd(lower), upper_optimizer=sgd(upper),
                                    settings=settings)
    del lower, upper
    return engines


def worker(args: argparse.Namespace) -> None:
    """One rank: build, warm up, measure one step, write this rank's numbers."""
    from bissl.distributed import (
        HypergradSettings,
        average_buffers_,
        bissl_step,
        exit_rank,
        import_deepspeed,
        init_process_group_from_env,
    )
    from bissl.distributed.step import hypergradient, lower_step, phi_snapshot, upper_step
    from bissl.distributed.testing import step_data

    info = init_process_group_from_env(timeout_s=900)
    import_deepspeed()
    gc.collect()
    baseline = _rss_kib("VmRSS")
    engines = _build(args.backbone, args.stage)
    image = (3, args.image, args.image) if args.backbone == "resnet18" else (1, 8, 8)
    classes = 10 if args.backbone == "resnet18" else 3
    # on_indefinite="warn": the memory does not depend on the answer (see docs/method.md §5 on the
    # indefinite Hessians of contrastive losses at initialisation).
    hyper = HypergradSettings(damping=args.damping, iters=5, on_indefinite="warn")

    def batches(step: int):
        data = step_data(0, step, world=info.world_size, lower_steps=1,
                         batch=args.batch * info.world_size, image=image, classes=classes)
        return data.for_rank(info.rank)

    bissl_step(engines, *batches(0), hyper)  # warm-up: creates the optimizer states
    lower_b, hvp_b, upper_b = batches(1)
    gc.collect()
    persistent = live_tensor_bytes()
    before = _rss_kib("VmRSS")
    peaks: dict[str, float] = {}

    def phase(name: str, fn, *args):
        _reset_peak_rss()
        out = fn(*args)
        peaks[name] = (_rss_kib("VmHWM") - before) / 1024
        return out

    # bissl_step, split at its phases so each one's peak is visible.
    t0 = time.perf_counter()
    phi = phase("phi_snapshot", phi_snapshot, engines)
    phase("lower_step", lower_step, engines, lower_b[0], phi)
    phi = None  # as bissl_step: the snapshot is dropped before the upper step
    injected, _ = phase("hypergradient", hypergradient, engines, hvp_b, upper_b, hyper)
    phase("upper_step", upper_step, engines, upper_b, injected)
    injected = None
    average_buffers_(engines.lower_module)
    average_buffers_(engines.upper_module)
    seconds = time.perf_counter() - t0
    gc.collect()
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for m in (engines.lower_module, engines.upper_module) for p in m.parameters())
    transient = max(peaks.values())
    row = {
        "rank": info.rank, "world_size": info.world_size, "zero_stage": args.stage,
        "params_both_copies": n_params,
        "persistent_tensors_mib": persistent / MIB,
        "persistent_tensors_after_mib": live_tensor_bytes() / MIB,
        "step_transient_rss_mib": transient,
        "phase_transient_rss_mib": peaks,
        "step_peak_mib": persistent / MIB + transient,
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
        code = launch(ranks, [str(script), "--worker", "--stage", str(stage), "--out", out,
                              "--backbone", args.backbone, "--batch", str(args.batch),
                              "--image", str(args.image), "--damping", str(args.damping)],
                      env=env, timeout_s=args.timeout, stream=log)
        if code != 0:
            raise RuntimeError(f"ranks={ranks} stage={stage} failed (exit {code}):\n{log.getvalue()[-4000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--backbone", choices=("resnet18", "small"), default="resnet18")
    parser.add_argument("--batch", type=int, default=2, help="images per rank per batch")
    parser.add_argument("--image", type=int, default=8, help="image side (ResNet-18, small-input stem)")
    parser.add_argument("--damping", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
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
            phases = "  ".join(f"{k} {v:.0f}" for k, v in r0["phase_transient_rss_mib"].items())
            print(f"stage {stage} ranks {ranks}: persistent {r0['persistent_tensors_mib']:6.1f} MiB + "
                  f"transient {r0['step_transient_rss_mib']:6.1f} MiB = peak {r0['step_peak_mib']:6.1f} MiB"
                  f"  [rank 0; {phases}]", flush=True)
    out = Path(args.out) if args.out else RESULTS / "zero_memory-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "backbone": args.backbone, "batch_per_rank": args.batch,
                               "image": args.image, "cg_iters": 5, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
