"""A densification strategy that changes nothing: for methods that train new per-Gaussian channels on a frozen,
already trained scene (the splatfacto training loop still calls the strategy around every backward pass)."""

from __future__ import annotations

from typing import Any, Dict


class FrozenStrategy:
    """gsplat's strategy interface with no growth, pruning or opacity reset."""

    absgrad = False

    def initialize_state(self, scene_scale: float = 1.0) -> Dict[str, Any]:
        return {}

    def step_pre_backward(self, *args: Any, **kwargs: Any) -> None:
        return None

    def step_post_backward(self, *args: Any, **kwargs: Any) -> None:
        return None
