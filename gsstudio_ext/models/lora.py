"""A small LoRA for ``nn.Linear`` layers (no peft): wrap, disable, save/load, merge.

``y = W x + b + (alpha / r) B A x`` with ``A: [r, in]`` (Kaiming-uniform, as ``nn.Linear``) and ``B: [out, r]`` zero,
so a freshly wrapped model computes exactly what it did before. RL3DEdit trains rank 32, alpha 32 on the FLUX.1-Kontext
transformer [P]; its target modules are not published, so :data:`FLUX_LORA_TARGETS` follows the common Flux LoRA
recipe (attention projections of both block types, the feed-forward layers of the double blocks, and ``proj_mlp`` /
``proj_out`` of the single blocks) [I]. Module names were checked against diffusers 0.42.1's
``FluxTransformer2DModel``.

Saved files are safetensors with keys ``<module name>.lora_A.weight`` / ``.lora_B.weight`` (peft's naming, so diffusers
LoRA files with a ``transformer.`` prefix load too) and metadata ``rank`` / ``alpha``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsstudio_ext.models.errors import require_path

FLUX_LORA_TARGETS: Tuple[str, ...] = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
    r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
    r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
)
"""Regexes full-matched against ``named_modules()`` names of a ``FluxTransformer2DModel`` [I]."""

_KEY_PREFIXES = ("base_model.model.", "transformer.")  # stripped when loading peft/diffusers files


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))``; the base layer is kept (frozen) as ``self.base``.

    The LoRA factors are float32 by default (stable AdamW updates on a bf16 base); the branch runs in their dtype and
    is cast back to the base output's dtype.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dtype: Optional[torch.dtype] = None
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.enabled = True
        dtype = dtype or torch.float32
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight (so code reading ``.weight.dtype`` / ``.weight.device`` keeps working)."""
        return self.base.weight

    def delta_weight(self) -> Tensor:
        """Float[out, in]: ``scale * B @ A`` in the LoRA dtype."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        a = self.lora_A.weight
        low = F.linear(F.linear(self.dropout(x).to(a.dtype), a), self.lora_B.weight)
        return out + (self.scale * low).to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"


# ======================================================================================================================
# attach / find
# ======================================================================================================================
def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, child)


def lora_modules(module: nn.Module) -> Dict[str, LoRALinear]:
    """Wrapped layers by module name (the name the layer had before wrapping)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def attach_lora(
    module: nn.Module,
    targets: Sequence[str] = FLUX_LORA_TARGETS,
    rank: int = 32,
    alpha: float = 32.0,
    dropout: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> List[str]:
    """Wrap every ``nn.Linear`` whose name full-matches one of ``targets`` (regexes; a plain name matches itself).

    Defaults: rank 32, alpha 32 [P RL3DEdit]; dropout 0 [I]. The LoRA factors require grad, the rest of ``module`` is
    untouched. Returns the wrapped names (sorted).

    Raises:
        ValueError: nothing matched (already wrapped layers do not match: their ``nn.Linear`` is ``<name>.base``).
    """
    patterns = [re.compile(t) for t in targets]
    chosen = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and any(p.fullmatch(name) for p in patterns)
    ]
    if not chosen:
        wrapped = lora_modules(module)
        hint = " (LoRA is already attached)" if wrapped else ""
        raise ValueError(f"no nn.Linear in {type(module).__name__} matches the LoRA targets {list(targets)}{hint}")
    for name in chosen:
        base = module.get_submodule(name)
        _set_child(module, name, LoRALinear(base, rank, alpha, dropout, dtype))
    return sorted(chosen)


def lora_parameters(module: nn.Module) -> List[nn.Parameter]:
    """All LoRA factors (A and B) of ``module``, set to require grad: the trainable set."""
    params: List[nn.Parameter] = []
    for m in lora_modules(module).values():
        for p in (m.lora_A.weight, m.lora_B.weight):
            p.requires_grad_(True)
            params.append(p)
    return params


@contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model (every LoRA branch off): the reference policy of the GRPO KL term.
    The previous on/off state of each layer is restored on exit."""
    layers = list(lora_modules(module).values())
    previous = [m.enabled for m in layers]
    try:
        for m in layers:
            m.enabled = False
        yield
    finally:
        for m, state in zip(layers, previous):
            m.enabled = state


# ======================================================================================================================
# save / load / merge
# ======================================================================================================================
def lora_state_dict(module: nn.Module) -> Dict[str, Tensor]:
    """``{<name>.lora_A.weight: Float[r, in], <name>.lora_B.weight: Float[out, r]}`` (detached, on the CPU)."""
    state: Dict[str, Tensor] = {}
    for name, m in lora_modules(module).items():
        state[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        state[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return state


def save_lora(module: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the LoRA factors of ``module`` to a safetensors file (temp file, then rename).

    Raises:
        ValueError: ``module`` has no LoRA, or its layers mix ranks/alphas (the metadata holds one of each).
    """
    from safetensors.torch import save_file

    layers = lora_modules(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA layers to save")
    ranks = {(m.rank, m.alpha) for m in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA layers mix (rank, alpha) values {sorted(ranks)}; save them separately")
    rank, alpha = ranks.pop()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "gsstudio-lora", "rank": str(rank), "alpha": str(alpha), "targets": json.dumps(sorted(layers))}
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(lora_state_dict(module), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read_lora_file(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = require_path(path, weight=f"LoRA file {path}", how="train one (rl3dedit GRPO) or pass the path of a saved LoRA")
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(p)), meta


def _split_key(key: str) -> Tuple[str, str]:
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
    if m is None:
        raise ValueError(f"not a LoRA weight key: {key!r}")
    return m.group(1), m.group(2)


def load_lora_state_dict(
    module: nn.Module,
    source: Union[str, os.PathLike, Dict[str, Tensor]],
    alpha: Optional[float] = None,
    strict: bool = True,
) -> List[str]:
    """Load LoRA factors from a safetensors file (or a state dict) into ``module``, wrapping the named layers first
    when they are not wrapped yet (rank from the tensor shapes; alpha from the file's metadata, else ``alpha``, else
    the rank as peft assumes). Returns the loaded layer names.

    Raises:
        MissingWeightsError: the file does not exist.
        ValueError: a key names no ``nn.Linear`` of ``module``, a shape disagrees, or (``strict``) a wrapped layer of
            ``module`` gets no weights.
    """
    if isinstance(source, dict):
        state, meta = source, {}
    else:
        state, meta = _read_lora_file(source)
    pairs: Dict[str, Dict[str, Tensor]] = {}
    for key, value in state.items():
        name, which = _split_key(key)
        pairs.setdefault(name, {})[which] = value
    file_alpha = float(meta["alpha"]) if "alpha" in meta else alpha
    layers = lora_modules(module)
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA weights of {name!r} need both lora_A and lora_B, got {sorted(pair)}")
        rank = int(pair["lora_A"].shape[0])
        if name not in layers:
            try:
                base = module.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"LoRA key {name!r} names no layer of {type(module).__name__}") from err
            if not isinstance(base, nn.Linear):
                raise ValueError(f"LoRA key {name!r} names a {type(base).__name__}, not an nn.Linear")
            layers[name] = LoRALinear(base, rank, file_alpha if file_alpha is not None else rank)
            _set_child(module, name, layers[name])
        layer = layers[name]
        for which, target in (("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight)):
            if tuple(pair[which].shape) != tuple(target.shape):
                raise ValueError(f"{name}.{which}: shape {list(pair[which].shape)} != layer's {list(target.shape)}")
            with torch.no_grad():
                target.copy_(pair[which].to(target.device, target.dtype))
        if file_alpha is not None:
            layer.alpha, layer.scale = float(file_alpha), float(file_alpha) / layer.rank
    missing = sorted(set(layers) - set(pairs))
    if strict and missing:
        raise ValueError(f"LoRA weights missing for {len(missing)} wrapped layers, e.g. {missing[:3]}")
    return sorted(pairs)


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA into its base weight (``W += scale B A``, in the base dtype) and put the plain ``nn.Linear``
    back. Disabled layers are unwrapped without merging. Returns the number of merged layers."""
    merged = 0
    for name, m in lora_modules(module).items():
        if m.enabled:
            m.base.weight += m.delta_weight().to(m.base.weight.dtype)
            merged += 1
        _set_child(module, name, m.base)
    return merged
