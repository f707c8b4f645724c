"""Can the tanh/ReLU CNN's convolutions run faster than the gradient's own? Three alternatives, timed.

On a CPU where the reference's kernels run at the gradient's FLOP rate, an exact HVP can beat the
reference only by its FLOP ratio (``docs/performance.md``) unless its convolutions run *faster*
than the ones a gradient uses. This study times, layer by layer on :class:`networks.PlainCNN`
(the benchmark's tanh/ReLU CNN, batch 32 per view, fp32), the convolution kernels a linearised
HVP calls against three ways of running the same products differently:

* ``views``: both views' products as **one batch of 64** instead of two calls of 32 each (what
  fusing the two views' forwards into one batch would buy every kernel of the HVP);
* ``layout``: the same kernels on **channels-last** activations instead of the standard layout
  (kernel time only: the layout copies a mixed network would add are left out, in its favour);
* ``weight_grad``: the weight gradient as autograd's stock double backward computes it, a
  **forward convolution with batch and channels swapped** (the varying operand transposed on every
  call, the fixed one once), instead of the grad-weight kernel.

Per layer the "kernels" are those one view's HVP runs per matvec kind: the forward, grad-input and
grad-weight convolution (the first layer, whose input is the images, has no grad-input). Each pair
is timed in interleaved rounds (:func:`bissl.bench.interleaved_rounds`) and its values compared
(they must agree to float32 rounding, or the study fails).

Run: ``python benchmarks/study_conv_kernels.py --out benchmarks/results/conv_kernels_study-run1.json``
(about 15 s on 2 cores; again with ``-run2``): ``benchmarks/make_tables.py`` renders the two runs into
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import networks
import torch
import torch.nn.functional as F
from torch import Tensor

from bissl.bench import interleaved_rounds, load_info, machine_info, max_rel_diff

OUT = Path(__file__).parent / "results" / "conv_kernels_study-run1.json"
#: Values of two routes to the same product may differ by float32 rounding only.
SAME_VALUES = 1e-4


def _conv_layers(net: networks.PlainCNN, batch: int) -> list[dict]:
    """Each convolution's shapes as the HVP sees them: input ``(batch, C, H, W)``, weight, stride."""
    layers, x = [], torch.zeros(batch, *networks.IMAGE)
    for mod in net.features:
        if isinstance(mod, torch.nn.Conv2d):
            layers.append(
                {"input": tuple(x.shape), "weight": tuple(mod.weight.shape), "stride": mod.stride[0], "pad": 1}
            )
        x = mod(x)
    return layers


def _kernels(layer: dict, batch: int, memory_format: torch.memory_format, gen: torch.Generator):
    """Random operands of one layer and its three kernels (forward, grad-input, grad-weight)."""
    _, c, h, w = layer["input"]
    s, p = layer["stride"], layer["pad"]
    x = torch.randn(batch, c, h, w, generator=gen)
    wt = torch.randn(*layer["weight"], generator=gen)
    go = torch.randn(F.conv2d(x, wt, None, s, p).shape, generator=gen)
    x, go = (t.contiguous(memory_format=memory_format) for t in (x, go))
    args = ([s, s], [p, p], [1, 1], False, [0, 0], 1)

    def fwd() -> Tensor:
        return F.conv2d(x, wt, None, s, p)

    def grad_input() -> Tensor:
        return torch.ops.aten.convolution_backward(go, x, wt, None, *args, [True, False, False])[0]

    def grad_weight() -> Tensor:
        return torch.ops.aten.convolution_backward(go, x, wt, None, *args, [False, True, False])[1]

    return (x, wt, go), {"forward": fwd, "grad_input": grad_input, "grad_weight": grad_weight}


def _run_all(*views: dict[str, Callable[[], Tensor]], names: list[str]) -> Callable[[], list[Tensor]]:
    """Every kernel in ``names`` of every view (each view its own operands, as in the HVP)."""
    return lambda: [kernels[k]() for kernels in views for k in names]


def _timed(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for call in calls.values():  # warm-up: oneDNN builds its primitives on the first call
        call()
    return {k: statistics.median(v) for k, v in interleaved_rounds(calls, rounds).items()}


def study_layer(layer: dict, first: bool, batch: int, rounds: int, seed: int) -> dict:
    """The three comparisons on one layer, each with its values checked."""
    names = ["forward", "grad_weight"] if first else ["forward", "grad_input", "grad_weight"]
    gen = torch.Generator().manual_seed(seed)
    (x, wt, go), std = _kernels(layer, batch, torch.contiguous_format, gen)
    _, other_view = _kernels(layer, batch, torch.contiguous_format, gen)
    _, two_views = _kernels(layer, 2 * batch, torch.contiguous_format, gen)
    gen = torch.Generator().manual_seed(seed)  # the same operands as `std`, channels-last
    _, nhwc = _kernels(layer, batch, torch.channels_last, gen)
    for k in names:
        if max_rel_diff(nhwc[k]().reshape(-1), std[k]().reshape(-1)) > SAME_VALUES:
            raise AssertionError(f"{layer}: channels-last {k} differs from the standard layout")
    out: dict[str, dict] = {"layer": dict(layer)}
    views = {"two_calls": _run_all(std, other_view, names=names), "one_batch": _run_all(two_views, names=names)}
    out["views"] = _timed(views, rounds)
    out["layout"] = _timed(
        {"standard": _run_all(std, names=names), "channels_last": _run_all(nhwc, names=names)}, rounds
    )

    s, p, kh = layer["stride"], layer["pad"], wt.shape[-1]
    x_swapped = x.transpose(0, 1).contiguous()  # the fixed operand (the layer's input), once

    def swapped() -> Tensor:
        # grad_w[o, i] = sum_n conv(x[n, i], go[n, o]) with go dilated by the stride: batch <-> channels.
        g = F.conv2d(x_swapped, go.transpose(0, 1).contiguous(), None, 1, p, s)
        return g[:, :, :kh, :kh].transpose(0, 1)

    if max_rel_diff(swapped().reshape(-1), std["grad_weight"]().reshape(-1)) > SAME_VALUES:
        raise AssertionError(f"{layer}: the swapped-convolution weight gradient differs")
    out["weight_grad"] = _timed({"grad_weight_kernel": std["grad_weight"], "swapped_forward": swapped}, rounds)
    return out


def summarise(layers: list[dict]) -> dict[str, dict[str, float]]:
    """Per comparison: each route's time summed over the layers and the ratio second / first."""
    total: dict[str, dict[str, float]] = {}
    for study in ("views", "layout", "weight_grad"):
        routes = list(layers[0][study])
        sums = {r: sum(layer[study][r] for layer in layers) for r in routes}
        total[study] = {**sums, "ratio": sums[routes[1]] / sums[routes[0]]}
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per view (the benchmark's 32)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = _conv_layers(networks.PlainCNN(), args.batch)
    load_before = load_info()
    results = [study_layer(layer, i == 0, args.batch, args.rounds, args.seed + i) for i, layer in enumerate(layers)]
    data = {
        "machine": machine_info(),
        "batch_per_view": args.batch,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": load_info(),
        "layers": results,
        "total": summarise(results),
    }
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for study, row in data["total"].items():
        print(study, {k: round(v * 1e3, 2) if k != "ratio" else round(v, 3) for k, v in row.items()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
