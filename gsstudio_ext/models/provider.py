"""Base of every pretrained-model provider: a plain object that builds its frozen model on first use.

Providers are never ``nn.Module`` attributes of a trained model (so never in a checkpoint). ``model`` stays None
until the first call that needs it (or :meth:`LazyProvider.load`); loading is guarded by a re-entrant lock because
the viewer and the trainer may ask at the same time.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Optional, TypeVar, Union

import torch
from nerfstudio.configs.base_config import InstantiateConfig

Device = Union[str, torch.device]
P = TypeVar("P", bound="LazyProvider")


class LazyProvider(ABC):
    """Holds ``config``, ``device`` and a lazily loaded, frozen (eval, no grad) ``model``."""

    config: InstantiateConfig

    def __init__(self, config: InstantiateConfig, device: Device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.model: Optional[torch.nn.Module] = None
        self._lock = threading.RLock()  # guards loading (and subclasses' caches)

    @abstractmethod
    def _load(self) -> None:
        """Set ``self.model`` on ``self.device``, plus whatever else the provider needs (tokenizer, ...)."""

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    def load(self: P) -> P:
        """Load the weights now (normally done on first use). Safe to call from several threads."""
        with self._lock:
            if self.model is None:
                self._load()
                assert self.model is not None, f"{type(self).__name__}._load did not set self.model"
                self.model.eval().requires_grad_(False)
        return self

    def to(self: P, device: Device) -> P:
        """Move the model (if loaded) to ``device``; later loads use it too."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self
