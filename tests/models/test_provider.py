"""LazyProvider: loads once on demand (also from several threads), freezes and moves the model, is no Module."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Type

import pytest
import torch
from nerfstudio.configs.base_config import InstantiateConfig

from gsstudio_ext.models.image_text import ImageTextEncoder
from gsstudio_ext.models.masks import MaskGenerator
from gsstudio_ext.models.provider import LazyProvider
from gsstudio_ext.models.text import TextEncoder


class _LinearProvider(LazyProvider):
    """Counts its loads; builds a 3->2 linear layer."""

    def __init__(self, config: InstantiateConfig, device: str = "cpu") -> None:
        super().__init__(config, device)
        self.loads = 0

    def _load(self) -> None:
        self.loads += 1
        self.model = torch.nn.Linear(3, 2).to(self.device)


@dataclass
class _LinearConfig(InstantiateConfig):
    _target: Type = field(default_factory=lambda: _LinearProvider)


def test_loads_once_frozen_and_in_eval_mode() -> None:
    p = _LinearConfig().setup()
    assert p.model is None and not p.is_loaded and p.loads == 0
    assert p.load() is p and p.load() is p
    assert p.is_loaded and p.loads == 1
    assert not p.model.training
    assert all(not q.requires_grad for q in p.model.parameters())


def test_concurrent_first_use_loads_once() -> None:
    p = _LinearConfig().setup()
    threads = [threading.Thread(target=p.load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.loads == 1


def test_to_moves_loaded_model_and_sets_device_for_later_loads() -> None:
    p = _LinearConfig().setup()
    assert p.to("meta") is p and p.device == torch.device("meta")
    assert p.load().model.weight.device == torch.device("meta")
    q = _LinearConfig().setup().load().to("meta")
    assert q.model.weight.device == torch.device("meta")


def test_load_that_sets_no_model_fails_clearly() -> None:
    class Broken(_LinearProvider):
        def _load(self) -> None:
            pass

    with pytest.raises(AssertionError, match="Broken._load did not set self.model"):
        Broken(_LinearConfig()).load()


def test_not_a_module_and_out_of_checkpoints() -> None:
    p = _LinearConfig().setup().load()
    holder = torch.nn.Module()
    holder.provider = p
    assert not isinstance(p, torch.nn.Module) and holder.state_dict() == {}


@pytest.mark.parametrize("cls", [TextEncoder, ImageTextEncoder, MaskGenerator])
def test_model_providers_share_the_base(cls: type) -> None:
    assert issubclass(cls, LazyProvider)
