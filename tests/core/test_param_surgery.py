"""Row surgery keeps parameters and their Adam state aligned."""

import torch
from torch.nn import Parameter

from gsstudio_ext.core.param_surgery import append_rows, keep_rows


def _setup():
    params = {"a": Parameter(torch.arange(12.0).reshape(6, 2)), "b": Parameter(torch.arange(6.0))}
    optimizers = {name: torch.optim.Adam([p], lr=0.1) for name, p in params.items()}
    loss = (params["a"] ** 2).sum() + (params["b"] ** 3).sum()
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    return params, optimizers


def test_keep_rows_selects_values_and_state():
    params, optimizers = _setup()
    before = optimizers["a"].state[params["a"]]["exp_avg"].clone()
    keep = torch.tensor([True, False, True, True, False, False])
    keep_rows(params, optimizers, ["a", "b"], keep)
    assert params["a"].shape == (3, 2) and params["b"].shape == (3,)
    assert optimizers["a"].param_groups[0]["params"][0] is params["a"]
    assert torch.equal(optimizers["a"].state[params["a"]]["exp_avg"], before[keep])


def test_append_rows_adds_values_with_zero_state():
    params, optimizers = _setup()
    append_rows(params, optimizers, {"a": torch.full((2, 2), 7.0), "b": torch.zeros(2)})
    assert params["a"].shape == (8, 2) and torch.equal(params["a"].data[-2:], torch.full((2, 2), 7.0))
    state = optimizers["a"].state[params["a"]]
    assert state["exp_avg"].shape == (8, 2) and torch.equal(state["exp_avg"][-2:], torch.zeros(2, 2))
    # the optimizer still steps the new parameter
    params["a"].grad = torch.ones_like(params["a"])
    optimizers["a"].step()
    assert torch.all(params["a"].data[-2:] < 7.0)
