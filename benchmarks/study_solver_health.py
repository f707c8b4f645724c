"""Solver-health study, part A: is BiSSL's system ``I + H/(λ+damping)`` indefinite, and what do the
``on_indefinite`` policies do to the hypergradient?

Setting (the ``bissl/configs/demo_digits.yaml`` pretext task on a smaller model, so that exact solves
fit the time budget): scikit-learn digits, SmallCNN (``--width`` 8, the demo uses 16; one input
channel), SimCLR lower loss (projector 128-128-64, τ 0.5, the "tiny" two-view augmentation), H on
one pretext batch of ``--hvp-batch`` 64 images (both views; the demo uses 128), λ = 1e-3. For each
seed, at random initialisation and after ``--pretext-steps`` SimCLR steps (LARS, lr 1.0, warm-up +
cosine, batch 256; the demo's 40 epochs are 200 steps), with a linear head fitted on frozen
features (as the BiSSL stage's head warm-up):

1. the extreme eigenvalues of H, estimated by 30 Lanczos steps from a random vector, on
   ``--batches`` pretext batches (the Ritz values are inner estimates: the true λ_min(H) is lower);
2. for each damping, whether the 5-iteration CG solve of the reference flags the system
   indefinite (``pᵀAp ≤ 0`` or a Ritz value ≤ 0), against whether the Lanczos estimate proves it is;
3. on the first batch, the hypergradient ``x`` of each policy against the exact solution of the
   system (MINRES to ``rtol`` 1e-5 or 300 iterations; its residual is reported): cosine and
   relative error, for ``--policy-dampings``.
   Policies: plain 5-iteration CG (what ``warn``, or report-only mode, returns), ``fallback`` to
   MINRES (5 iterations), ``fallback`` to the identity (first order), ``adaptive_damping``, and the
   reference code's behaviour (layer-wise CG, 5 iterations, NaN → 0).

Run: ``python benchmarks/study_solver_health.py`` (a few minutes on 2 CPU cores); writes
``benchmarks/results/solver_health_study.json`` and prints a summary. Everything runs in float32,
as the trainer (float64 convolutions are about 5x slower on CPU).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bissl.data import load_dataset
from bissl.hypergrad import implicit_hypergrad, reference_hypergrad
from bissl.models import build_backbone
from bissl.ops import flatten, linearize_hvp
from bissl.optim import LARS
from bissl.optim.schedules import cosine_with_warmup
from bissl.solvers import IndefiniteSystemWarning, minres_solve
from bissl.tasks.augment import TwoViewAugment
from bissl.tasks.pretext import build_pretext

LAM = 1e-3
ITERS = 5
PROJECTOR = (128, 128, 64)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def pretext_train(
    net: nn.Module, pretext: nn.Module, x: torch.Tensor, aug: TwoViewAugment, steps: int, gen: torch.Generator
) -> None:
    """SimCLR pretraining as the demo config: LARS lr 1.0, 10% warm-up, cosine, batch 256."""
    if steps == 0:
        return
    params = list(net.parameters()) + list(pretext.parameters())
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-6, eta=1e-3)
    sched = cosine_with_warmup(opt, total_steps=steps, warmup_steps=max(1, steps // 10))
    net.train()
    pretext.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        v1, v2 = aug(x[idx], gen)
        loss = pretext.loss(net, v1, v2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()


def fit_head(net: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> nn.Linear:
    """A linear head on frozen features (the BiSSL stage's head warm-up)."""
    with torch.no_grad():
        net.eval()
        feats = net(x)
        net.train()
    head = nn.Linear(feats.shape[1], classes).to(feats.dtype)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(head(feats), y).backward()
        opt.step()
    return head


def analyse(net, pretext, head, data_x, data_y, aug, gen, args) -> dict:
    buffers = dict(net.named_buffers())
    theta = {k: p.detach().clone() for k, p in net.named_parameters()}
    out = {"batches": []}
    for bi in range(args.batches):
        idx = torch.randperm(len(data_x), generator=gen)[: args.hvp_batch]
        v1, v2 = aug(data_x[idx], gen)
        didx = torch.randperm(len(data_x), generator=gen)[: args.hvp_batch]
        dx, dy = data_x[didx], data_y[didx]

        def lower_loss(p, v1=v1, v2=v2):
            return pretext.loss(lambda im: functional_call(net, {**p, **buffers}, (im,)), v1, v2)

        def upper_loss(p, dx=dx, dy=dy):
            return F.cross_entropy(head(functional_call(net, {**p, **buffers}, (dx,))), dy)

        op = linearize_hvp(lower_loss, theta)
        probe = torch.randn(op.spec.numel, generator=gen)
        lanczos = minres_solve(op.matvec, probe, iters=30)
        h_min, h_max = float(lanczos.ritz_min), float(lanczos.ritz_max)
        row = {"h_min_est": h_min, "h_max_est": h_max, "dampings": {}}
        for damping in args.dampings:
            c = LAM + damping
            _, info = implicit_hypergrad(
                lower_loss, upper_loss, theta, lam=LAM, damping=damping, iters=ITERS, strict=False, return_info=True
            )
            entry = {
                "cg_flagged": bool(info.indefinite),
                "cg_ritz_min": float(info.ritz_min),
                "lanczos_proves_indefinite": 1 + h_min / c <= 0,
            }
            if bi == 0 and damping in args.policy_dampings:
                entry["policies"] = policies(lower_loss, upper_loss, theta, damping)
            row["dampings"][str(damping)] = entry
        out["batches"].append(row)
    return out


def policies(lower_loss, upper_loss, theta, damping) -> dict:
    kw = dict(lam=LAM, damping=damping, return_info=True)
    exact, ex_info = implicit_hypergrad(
        lower_loss, upper_loss, theta, solver="minres", iters=300, rtol=1e-5, strict=False, **kw
    )
    exact = flatten(exact)
    res = {"exact_relative_residual": ex_info.summary()["relative_residual"], "exact_iters": int(ex_info.iters)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IndefiniteSystemWarning)
        runs = {
            "cg (warn / report)": dict(on_indefinite="warn"),
            "fallback:minres": dict(on_indefinite="fallback", fallback="minres"),
            "fallback:identity": dict(on_indefinite="fallback", fallback="identity"),
            "adaptive_damping": dict(on_indefinite="adaptive_damping"),
        }
        for name, extra in runs.items():
            x, info = implicit_hypergrad(lower_loss, upper_loss, theta, iters=ITERS, strict=False, **kw, **extra)
            x = flatten(x)
            res[name] = {
                "cos": _cos(x, exact),
                "rel_err": _rel(x, exact),
                "action": info.action,
                "damping_used": info.damping_used,
            }
    ref = reference_hypergrad(lower_loss, upper_loss, theta, lam=LAM, damping=damping, iters=ITERS, layerwise=True)
    ref = flatten(ref)
    res["reference (layer-wise CG, NaN->0)"] = {
        "cos": _cos(torch.nan_to_num(ref, nan=0.0, posinf=0.0, neginf=0.0), exact),
        "rel_err": _rel(torch.nan_to_num(ref, nan=0.0, posinf=0.0, neginf=0.0), exact),
        "had_nan": bool(~torch.isfinite(ref).all()),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretext-steps", type=int, default=200)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    ap.add_argument("--policy-dampings", type=float, nargs="+", default=[10.0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--hvp-batch", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "solver_health_study.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    data = load_dataset("digits")
    x, y = data.train.tensors
    aug = TwoViewAugment("tiny", mean=data.mean, std=data.std)
    results = {"config": vars(args) | {"lam": LAM, "iters": ITERS}, "runs": []}
    for seed in args.seeds:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = build_backbone("small_cnn", in_channels=1, width=args.width)
        pretext = build_pretext("simclr", backbone=net, feat_dim=net.out_dim, proj_dims=PROJECTOR)
        for stage, steps in (("init", 0), ("pretext", args.pretext_steps)):
            pretext_train(net, pretext, x, aug, steps, gen)
            head = fit_head(net, x, y, data.num_classes)
            r = analyse(net, pretext, head, x, y, aug, gen, args)
            r |= {"seed": seed, "stage": stage, "pretext_steps": steps}
            results["runs"].append(r)
            print(
                f"seed {seed} {stage}: λ_min(H) est {[round(b['h_min_est'], 2) for b in r['batches']]} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    results["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    summarize(results)


def summarize(results: dict) -> None:
    dampings = [str(d) for d in results["config"]["dampings"]]
    for stage in ("init", "pretext"):
        runs = [r for r in results["runs"] if r["stage"] == stage]
        hmins = [b["h_min_est"] for r in runs for b in r["batches"]]
        print(
            f"\n== {stage}: λ_min(H) estimates min {min(hmins):.3g}, median "
            f"{sorted(hmins)[len(hmins) // 2]:.3g}, max {max(hmins):.3g} ({len(hmins)} batches)"
        )
        for d in dampings:
            entries = [b["dampings"][d] for r in runs for b in r["batches"]]
            flagged = sum(e["cg_flagged"] for e in entries)
            proven = sum(e["lanczos_proves_indefinite"] for e in entries)
            print(f"  damping {d}: CG-5 flags {flagged}/{len(entries)}, Lanczos proves {proven}/{len(entries)}")
            pol = [r["batches"][0]["dampings"][d].get("policies") for r in runs]
            if not pol[0]:
                continue
            for name in pol[0]:
                if not isinstance(pol[0][name], dict):
                    continue
                cos = [p[name]["cos"] for p in pol]
                print(f"    {name:36s} cos to exact: " + " ".join(f"{c:+.3f}" for c in cos))
    print(f"\nwall time {results['wall_s']} s")


if __name__ == "__main__":
    main()
