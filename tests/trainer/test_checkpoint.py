"""Checkpoints load with torch.load(weights_only=True): everything we save round-trips, anything
else (an arbitrary pickled object) is refused without running it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bissl.trainer.checkpoint import CheckpointError, load_checkpoint, save_atomic
from bissl.trainer.rng import capture_global_rng, restore_global_rng

RAN: list[str] = []


def _payload_ran(tag: str) -> str:
    RAN.append(tag)
    return tag


class _Payload:
    """Unpickling this calls ``_payload_ran``: what a malicious file would do with os.system."""

    def __reduce__(self):
        return _payload_ran, ("payload",)


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), random.random()


def test_rng_and_training_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state
    gen = torch.Generator().manual_seed(3)
    state = {
        "format": 3,
        "phase": "bissl",
        "step_idx": 7,
        "rng": capture_global_rng(),
        "state": {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "lams": [1e-3, 2e-3],
            "name": "x",
            "flag": True,
            "none": None,
        },
    }
    expected = _draws()
    save_atomic(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    restore_global_rng(loaded["rng"])
    assert _draws() == expected  # torch, numpy (with its cached Gaussian) and python continue exactly
    assert loaded["step_idx"] == 7 and loaded["state"]["lams"] == [1e-3, 2e-3]
    assert loaded["state"]["opt"]["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(loaded["state"]["gen"], gen.get_state())


def test_a_file_with_an_arbitrary_object_is_refused_unrun(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state": {"x": torch.ones(2)}, "extra": _Payload()}, path)
    RAN.clear()
    with pytest.raises(CheckpointError, match=r"evil\.pt is not a checkpoint bissl loads.*_payload_ran"):
        load_checkpoint(path)
    assert RAN == []


def test_numpy_arrays_are_refused(tmp_path):
    """The old RNG format (numpy's state tuple with an array) cannot be loaded safely."""
    path = tmp_path / "old.pt"
    torch.save({"rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match="numpy"):
        load_checkpoint(path)
