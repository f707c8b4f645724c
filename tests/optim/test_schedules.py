"""Tests for bissl.optim.cosine_with_warmup: values at key steps and exact resume."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch

from bissl.optim import cosine_with_warmup


def _lrs(total=100, warmup=10, final=0.01, base=0.2, steps=120):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = cosine_with_warmup(opt, total, warmup, final)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_values_at_key_steps():
    lrs = _lrs()
    assert lrs[0] == pytest.approx(0.2 / 10)  # first warm-up step
    assert lrs[4] == pytest.approx(0.2 * 5 / 10)
    assert lrs[9] == pytest.approx(0.2)  # warm-up end
    assert lrs[10] == pytest.approx(0.2)  # cosine start
    assert lrs[55] == pytest.approx(0.2 * (0.01 + 0.99 * 0.5))  # midpoint of the cosine
    assert lrs[30] == pytest.approx(0.2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 20 / 90))))
    assert lrs[100] == pytest.approx(0.2 * 0.01)  # end
    assert lrs[119] == pytest.approx(0.2 * 0.01)  # stays at the floor afterwards
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_no_warmup_starts_at_base():
    lrs = _lrs(total=10, warmup=0, final=0.0, steps=11)
    assert lrs[0] == pytest.approx(0.2) and lrs[5] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.0)


def test_resume_from_state_dict_continues_identically():
    def make():
        w = torch.zeros(2, requires_grad=True)
        opt = torch.optim.SGD([w], lr=1.5, momentum=0.9)
        return opt, cosine_with_warmup(opt, 50, 5, 0.001)

    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    saved = pickle.loads(pickle.dumps((opt.state_dict(), sched.state_dict())))
    expect = []
    for _ in range(40):
        expect.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    opt2, sched2 = make()
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    got = []
    for _ in range(40):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert got == expect
    pickle.dumps(sched2.lr_lambdas[0])  # the schedule object itself pickles


def test_bad_arguments():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_with_warmup(opt, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(opt, 10, 11)
    with pytest.raises(ValueError, match="final_factor"):
        cosine_with_warmup(opt, 10, 1, 2.0)
