"""Row surgery on per-Gaussian parameters and their Adam state: keep a subset, or append new rows.

Densification strategies change how many rows a group of parameters has (Gaussians, anchors...). Each parameter
is replaced by a new ``nn.Parameter`` and its optimizer's per-row state (``exp_avg``, ``exp_avg_sq``) follows:
kept rows keep their state, appended rows start from zero.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, MutableMapping, Optional

import torch
from torch import Tensor
from torch.nn import Parameter


def _swap(
    params: MutableMapping[str, Parameter],
    optimizers: Mapping[str, torch.optim.Optimizer],
    name: str,
    new_value: Tensor,
    state_fn,
) -> None:
    old = params[name]
    new = Parameter(new_value.contiguous(), requires_grad=old.requires_grad)
    optimizer: Optional[torch.optim.Optimizer] = optimizers.get(name)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                if param is not old:
                    continue
                state = optimizer.state.pop(old, None)
                if state is not None:
                    for key, value in state.items():
                        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == old.shape[0]:
                            state[key] = state_fn(value)
                    optimizer.state[new] = state
                group["params"][i] = new
    params[name] = new


@torch.no_grad()
def keep_rows(
    params: MutableMapping[str, Parameter],
    optimizers: Mapping[str, torch.optim.Optimizer],
    names: Iterable[str],
    keep: Tensor,
) -> None:
    """Keep the rows ``keep`` (bool mask or index tensor) of every parameter in ``names``."""
    for name in names:
        _swap(params, optimizers, name, params[name].data[keep], lambda value: value[keep])


@torch.no_grad()
def append_rows(
    params: MutableMapping[str, Parameter],
    optimizers: Mapping[str, torch.optim.Optimizer],
    new_rows: Dict[str, Tensor],
) -> None:
    """Append ``new_rows[name]`` [M, ...] to each named parameter; their optimizer state starts at zero."""
    for name, rows in new_rows.items():
        rows = rows.to(params[name].device, params[name].dtype)

        def grow(value: Tensor, count: int = rows.shape[0]) -> Tensor:
            return torch.cat([value, value.new_zeros((count, *value.shape[1:]))])

        _swap(params, optimizers, name, torch.cat([params[name].data, rows]), grow)
