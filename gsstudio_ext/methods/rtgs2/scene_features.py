"""RT-GS2 per-scene feature bake: the trained point backbone runs once on all Gaussians of a scene (spec §4.3, §4.5).

The (N, 32) result is view-independent, so it is computed once, cached on disk keyed by the scene's input tensors
and the backbone's weights, and splatted per frame next to the RGB. ``scene_with_features`` stores it as the extra
"f_pc", which ``core.ply.write_ply`` writes as PLY properties ``f_pc_0 .. f_pc_31`` (the official layout).
"""

from __future__ import annotations

import hashlib
import io
import warnings
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from gsstudio_ext.core.atomic import atomic_write
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.methods.rtgs2.ssl import gaussian_inputs

FEATURE_EXTRA = "f_pc"
"""Name of the per-Gaussian feature extra (PLY columns f_pc_0 .. f_pc_{D-1})."""

CACHE_FORMAT = 1
"""Bumped when the bake inputs or the file layout change, so old cache files are not reused."""

NamedTensors = Sequence[Tuple[str, Tensor]]


def bake_inputs(scene: GaussianScene) -> Tuple[Tensor, Tensor, Tensor]:
    """(coords [N, 3], feats [N, 10], batch Long[N] of zeros) for the bake: no augmentation, but the coordinates
    are centred on the scene mean, as every training view was (a translation only)."""
    feats = gaussian_inputs(scene)
    if scene.num_gaussians:
        feats[:, :3] -= feats[:, :3].mean(dim=0)
    batch = torch.zeros(scene.num_gaussians, dtype=torch.long, device=scene.device)
    return feats[:, :3].contiguous(), feats, batch


def bake_features(backbone: nn.Module, scene: GaussianScene, dtype: torch.dtype = torch.float16) -> Tensor:
    """Float [N, D] (D = 32 for the RT-GS2 backbone) features of every Gaussian, in ``dtype``.

    One forward in eval mode under ``torch.no_grad()`` on ``bake_inputs(scene)``; the module's training flag is
    restored afterwards. fp16 halves the memory of the per-frame feature splat (spec §4.9.2).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(*bake_inputs(scene))
    finally:
        backbone.train(was_training)
    if out.dim() != 2 or out.shape[0] != scene.num_gaussians:
        raise ValueError(f"bake_features: backbone returned {tuple(out.shape)}; expected [N={scene.num_gaussians}, D]")
    return out.to(dtype)


def scene_with_features(scene: GaussianScene, feats: Tensor, name: str = FEATURE_EXTRA) -> GaussianScene:
    """A copy of ``scene`` (tensors shared) with ``feats`` [N, D] as the extra ``name`` (written as name_0..D-1)."""
    if feats.dim() != 2 or feats.shape[0] != scene.num_gaussians:
        raise ValueError(f"scene_with_features: feats must be [N={scene.num_gaussians}, D], got {tuple(feats.shape)}")
    extras = dict(scene.extras)
    extras[name] = feats.to(scene.device)
    return GaussianScene(
        means=scene.means,
        quats=scene.quats,
        log_scales=scene.log_scales,
        opacity_logits=scene.opacity_logits,
        sh_dc=scene.sh_dc,
        sh_rest=scene.sh_rest,
        extras=extras,
    )


# ---------------------------------------------------------------------------------------------------------- hashing


def _hash_tensors(named: NamedTensors, salt: str) -> str:
    """sha256 of names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in named:
        t = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _DigestMemo:
    """Remembers the digest of a list of tensors while none of them is replaced or modified in place (tracked by
    object identity through weak references and autograd's version counter), so repeated calls skip hashing.
    In-place writes through ``.data`` bypass the version counter: call ``FeatureCache.clear_memory()`` after them."""

    def __init__(self) -> None:
        self._entries: Dict[Tuple[int, ...], Tuple[List[weakref.ref], Tuple[int, ...], str]] = {}

    def digest(self, named: NamedTensors, salt: str) -> str:
        tensors = [t for _, t in named]
        ids = (hash(salt), *(id(t) for t in tensors))
        versions = tuple(t._version for t in tensors)
        entry = self._entries.get(ids)
        if entry is not None:
            refs, old_versions, value = entry
            if old_versions == versions and all(r() is t for r, t in zip(refs, tensors)):
                return value
        value = _hash_tensors(named, salt)
        self._entries[ids] = ([weakref.ref(t) for t in tensors], versions, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


def _scene_tensors(scene: GaussianScene) -> NamedTensors:
    """The scene tensors the bake reads (rotations and higher SH do not enter the 10-channel input)."""
    return [
        ("means", scene.means),
        ("log_scales", scene.log_scales),
        ("opacity_logits", scene.opacity_logits),
        ("sh_dc", scene.sh_dc),
    ]


def _module_tensors(module: nn.Module) -> NamedTensors:
    """Parameters and buffers as the module holds them (state_dict() would return fresh detached objects)."""
    return [*module.named_parameters(), *module.named_buffers()]


# ---------------------------------------------------------------------------------------------------------- cache


class FeatureCache:
    """Baked features on disk under ``root``, one file per (scene inputs, backbone weights, dtype), plus an
    in-memory copy: a second ``get`` for the same scene and weights neither hashes, reads nor runs the backbone.

    Files are written atomically (temp file + rename); a file that cannot be read or does not match is rebaked
    and rewritten, with a warning.
    """

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)
        self._memory: Dict[str, Tensor] = {}
        self._memo = _DigestMemo()

    def key(self, backbone: nn.Module, scene: GaussianScene, dtype: torch.dtype = torch.float16) -> str:
        """Cache key: sha256 over the scene digest, the backbone digest (class + weights) and the dtype."""
        scene_digest = self._memo.digest(_scene_tensors(scene), "scene")
        model_digest = self._memo.digest(_module_tensors(backbone), f"model|{type(backbone).__qualname__}")
        text = f"v{CACHE_FORMAT}|{scene_digest}|{model_digest}|{dtype}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        """File holding the features of ``key``."""
        return self.root / f"f_pc_{key}.pt"

    def clear_memory(self) -> None:
        """Forget the in-memory features and digests (the files stay)."""
        self._memory.clear()
        self._memo.clear()

    def get(self, backbone: nn.Module, scene: GaussianScene, dtype: torch.dtype = torch.float16) -> Tensor:
        """Float [N, D] features of ``scene`` (on the scene's device): from memory, else from disk, else baked
        with ``bake_features`` and stored."""
        key = self.key(backbone, scene, dtype)
        cached = self._memory.get(key)
        if cached is not None:
            return cached
        feats = self._load(key, scene.num_gaussians, dtype)
        if feats is None:
            feats = bake_features(backbone, scene, dtype)
            self._store(key, feats)
        feats = feats.to(scene.device)
        self._memory[key] = feats
        return feats

    def _load(self, key: str, num: int, dtype: torch.dtype) -> Optional[Tensor]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            feats = payload["features"]
            ok = (
                payload.get("key") == key
                and isinstance(feats, Tensor)
                and feats.dim() == 2
                and feats.shape[0] == num
                and feats.dtype == dtype
            )
            if not ok:
                raise ValueError("content does not match the scene and backbone")
            return feats
        except Exception as err:  # any unreadable or mismatched file is rebaked, never trusted
            warnings.warn(f"feature cache file {path} is unusable ({err}); baking the features again", stacklevel=3)
            return None

    def _store(self, key: str, feats: Tensor) -> None:
        buffer = io.BytesIO()
        torch.save({"key": key, "features": feats.detach().cpu()}, buffer)
        atomic_write(self.path(key), lambda handle: handle.write(buffer.getvalue()))
