"""Learning-rate schedule and optimizers."""

from __future__ import annotations

import math

import pytest
import torch

from sumtune.optim import build_optimizer, get_lr


def test_warmup_then_linear_decay_to_zero():
    lrs = [get_lr(s, peak_lr=1.0, warmup_steps=4, total_steps=12, schedule="linear") for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert get_lr(12, peak_lr=1.0, warmup_steps=4, total_steps=12, schedule="linear") == 0.0


def test_cosine_and_constant():
    assert get_lr(0, peak_lr=2.0, warmup_steps=0, total_steps=10, schedule="cosine") == 2.0
    assert get_lr(5, peak_lr=2.0, warmup_steps=0, total_steps=10, schedule="cosine") == pytest.approx(1.0)
    assert get_lr(10, peak_lr=2.0, warmup_steps=0, total_steps=10, schedule="cosine") == pytest.approx(0.0)
    assert {get_lr(s, peak_lr=3.0, warmup_steps=0, total_steps=5, schedule="constant") for s in range(5)} == {3.0}
    warm = [get_lr(s, peak_lr=1.0, warmup_steps=2, total_steps=5, schedule="constant") for s in range(5)]
    assert [math.isclose(a, b) for a, b in zip(warm, [0.5, 1.0, 1.0, 1.0, 1.0])] == [True] * 5  # warm-up, then flat


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_every_optimizer_takes_a_step_on_the_cpu(name):
    param = torch.nn.Parameter(torch.ones(64, 64))
    opt = build_optimizer(name, [param], lr=0.1, weight_decay=0.0, device=torch.device("cpu"))
    param.grad = torch.full_like(param, 10.0)
    opt.step()
    # Adam's first step moves every weight by lr whatever the gradient's size (SGD would move it by lr x 10).
    assert torch.allclose(param.detach(), torch.full_like(param, 0.9), atol=2e-3)
    state = opt.state[param]
    if name.endswith("8bit"):  # bitsandbytes keeps both moments in 8 bits
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    else:
        assert state["exp_avg"].dtype == torch.float32
