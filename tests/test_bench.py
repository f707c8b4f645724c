"""``bissl bench``: the command runs on a user's factory, writes JSON, compares, and refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch

from bissl.bench import build_problem, count_flops, interleaved_rounds, max_rel_diff, peak_memory_mb
from bissl.cli import build_parser, main

# A tiny positive definite problem (float64 MLP, λ + damping = 1.5): answers must agree closely.
FAST = [
    "--batch",
    "4",
    "--rounds",
    "2",
    "--iters",
    "3",
    "--lam",
    "0.5",
    "--damping",
    "1.0",
    "--dtype",
    "float64",
    "--quiet",
]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["bench", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--batch", "--solver", "--iters", "--hvp-mode", "--dtype", "--device", "--compare"):
        assert option in out


@pytest.mark.parametrize("solver", ["cg", "cg_layerwise"])
def test_a_real_run_on_a_factory_writes_json_and_compares(tmp_path, capsys, solver):
    out = tmp_path / "run.json"
    args = ["bench", "--model", "bissl.testing:mlp_problem", "--solver", solver, "--out", str(out), *FAST]
    assert main(args) == 0
    result = json.loads(out.read_text())
    h = result["hypergradient"]
    assert result["config"]["solver"] == solver and result["config"]["params"] > 0
    assert len(h["ours_per_round_s"]) == 2 and len(h["reference_per_round_s"]) == 2
    assert h["speedup"] == pytest.approx(h["reference_median_s"] / h["ours_median_s"])
    assert h["max_rel_diff"] < 1e-10  # same math (the reference runs without its 1e-12 guard)
    assert set(result["hvp"]) == {"revrev", "fwdrev", "autograd", "linearized_matvec"}
    assert all(r["ratio_to_gradient"] > 0 for r in result["hvp"].values())
    # FLOPs, counted: an exact HVP differentiates every product of the gradient once more, so the
    # linearised matvec does more than one and at most two gradients' FLOPs; the reference's loop
    # (forward, gradient and double backward per iteration) does more than ours.
    assert result["gradient_flops"] > 0
    assert 1.0 < result["hvp"]["linearized_matvec"]["flops_ratio_to_gradient"] <= 2.0 + 1e-9
    assert h["flop_ratio"] == pytest.approx(h["reference_flops"] / h["ours_flops"]) and h["flop_ratio"] > 1.0
    assert {"torch", "cpu", "threads"} <= set(result["machine"])
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "linearized matvec" in printed and "FLOP ratio" in printed

    again = tmp_path / "again.json"
    assert (
        main(
            [
                "bench",
                "--model",
                "bissl.testing:mlp_problem",
                "--solver",
                solver,
                "--out",
                str(again),
                "--compare",
                str(out),
                "--hvp-mode",
                "revrev",
                *FAST,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "compared with" in printed and "speedup" in printed and "configurations differ" in printed


def test_factories_may_return_a_backbone_or_a_triple(tmp_path, monkeypatch):
    module = tmp_path / "my_models.py"
    module.write_text(
        "import torch, torch.nn as nn\n"
        "from bissl.testing import mlp_problem\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = nn.Conv2d(1, 2, 3); self.out_dim = 2\n"
        "    def forward(self, x):\n"
        "        return torch.tanh(self.conv(x)).mean((2, 3))\n"
        "def backbone():\n"
        "    return Net()\n"
        "def triple(batch, dtype):\n"
        "    p = mlp_problem(batch=batch, dtype=dtype)\n"
        "    return p.lower_loss, p.upper_loss, p.params\n"
    )
    monkeypatch.chdir(tmp_path)
    prob = build_problem("my_models:backbone", batch=3, dtype=torch.float64, image=(1, 5, 5))
    assert set(prob.params) == {"conv.weight", "conv.bias"} and prob.lower_loss(prob.params).dim() == 0
    prob = build_problem("my_models:triple", batch=3, dtype=torch.float64)
    assert prob.upper_loss(prob.params).dim() == 0


def test_bad_input_is_refused_with_a_reason(tmp_path, capsys):
    assert main(["bench", "--model", "no_such_module:f", "--out", str(tmp_path / "x.json"), "--quiet"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert (
        main(
            [
                "bench",
                "--model",
                "bissl.testing:mlp_problem",
                "--hvp-mode",
                "magic",
                "--quiet",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    assert "--hvp-mode" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench", "--model", "bissl.testing:mlp_problem", "--compare", str(bad), "--quiet"]) == 2
    assert "not a bissl bench result" in capsys.readouterr().err


def test_interleaved_rounds_alternate_the_order():
    order: list[str] = []
    times = interleaved_rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_helpers_measure_what_they_say():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert count_flops(lambda: a.sin()) == 0  # elementwise ops are not counted
    # Products accumulated in place count as their out-of-place forms (the rerouted linear
    # double backward uses addmm_: uncounted, it made our FLOP ratio look 20% better).
    c, bb = torch.randn(8, 4), torch.randn(3, 8, 16)
    assert count_flops(lambda: c.addmm_(a, b)) == count_flops(lambda: torch.addmm(c, a, b)) == 2 * 8 * 16 * 4
    cc = torch.randn(3, 8, 4)
    assert count_flops(lambda: cc.baddbmm_(bb, b.expand(3, 16, 4))) == 2 * 3 * 8 * 16 * 4
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert max_rel_diff(ref + torch.tensor([0.0, 0.0, 0.4]), ref) == pytest.approx(0.1)
    grown = peak_memory_mb(lambda: torch.ones(20_000_000).sum())  # 80 MB while it lives
    assert grown is None or grown > 40
