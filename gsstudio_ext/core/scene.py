"""`GaussianScene`: the raw (pre-activation) parameters of a 3D Gaussian Splatting scene.

The tensors are stored exactly as the original 3DGS code and nerfstudio's splatfacto store them:

- ``means``          [N, 3]        centres
- ``quats``          [N, 4]        rotations, wxyz, not necessarily normalised
- ``log_scales``     [N, 3]        log of the per-axis standard deviations
- ``opacity_logits`` [N]           logit of the opacity
- ``sh_dc``          [N, 3]        degree-0 SH coefficient per colour channel
- ``sh_rest``        [N, K-1, 3]   higher SH coefficients, K = (degree + 1)^2 (K-1 may be 0)
- ``extras``         name -> [N] or [N, D] tensor (float, int or bool): any other per-Gaussian quantity
                     (``instance_id``, ``label``, ``feature`` ...). Every row operation keeps them aligned.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

# splatfacto's gauss_params names of the core parameters.
SPLATFACTO_KEYS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")

# Extra names must be usable as PLY property names (see gsstudio_ext.core.ply).
_EXTRA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Index = Union[Tensor, np.ndarray, Sequence[int], Sequence[bool], slice]


def _sh_degree_from_rest(num_rest: int) -> int:
    """SH degree d such that (d + 1)^2 - 1 == num_rest, or -1 if there is none."""
    degree = int(round(math.sqrt(num_rest + 1))) - 1
    return degree if (degree + 1) ** 2 - 1 == num_rest else -1


@dataclass
class GaussianScene:
    """Raw 3DGS parameters of N Gaussians plus aligned per-Gaussian extras (shapes in the module docstring)."""

    means: Tensor
    """Centres [N, 3]."""
    quats: Tensor
    """Rotations as quaternions wxyz [N, 4], unnormalised."""
    log_scales: Tensor
    """Log standard deviations [N, 3]."""
    opacity_logits: Tensor
    """Opacity logits [N]."""
    sh_dc: Tensor
    """Degree-0 SH coefficients [N, 3]."""
    sh_rest: Tensor
    """Higher SH coefficients [N, K-1, 3], K = (sh_degree + 1)^2."""
    extras: Dict[str, Tensor] = field(default_factory=dict)
    """Other per-Gaussian tensors, each [N] or [N, D]."""

    # ------------------------------------------------------------------ basic properties

    @property
    def num_gaussians(self) -> int:
        """Number of Gaussians N."""
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        """SH degree d, from K - 1 = (d + 1)^2 - 1 rest coefficients."""
        degree = _sh_degree_from_rest(int(self.sh_rest.shape[1]))
        if degree < 0:
            raise ValueError(f"sh_rest has {self.sh_rest.shape[1]} coefficients; expected (d+1)^2 - 1 for some d")
        return degree

    @property
    def device(self) -> torch.device:
        return self.means.device

    def __len__(self) -> int:
        return self.num_gaussians

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, sh_degree: int = 0, device: Union[str, torch.device] = "cpu") -> "GaussianScene":
        """A scene with zero Gaussians."""
        return cls.random(0, sh_degree=sh_degree, device=device)

    @classmethod
    def random(
        cls, num: int, sh_degree: int = 0, seed: int = 0, device: Union[str, torch.device] = "cpu"
    ) -> "GaussianScene":
        """A reproducible random scene (float32) for tests and demos: means in [-1, 1]^3, small scales."""
        gen = torch.Generator().manual_seed(seed)
        k_rest = (sh_degree + 1) ** 2 - 1
        scene = cls(
            means=torch.rand(num, 3, generator=gen) * 2 - 1,
            quats=torch.randn(num, 4, generator=gen),
            log_scales=torch.rand(num, 3, generator=gen) * 2 - 5,
            opacity_logits=torch.randn(num, generator=gen),
            sh_dc=torch.randn(num, 3, generator=gen) * 0.5,
            sh_rest=torch.randn(num, k_rest, 3, generator=gen) * 0.1,
        )
        return scene.to(device)

    # ------------------------------------------------------------------ checks

    def validate(self) -> "GaussianScene":
        """Check shapes, dtypes, row counts and finiteness; raise ``ValueError`` naming the offending tensor.

        Returns ``self`` so it can be chained.
        """
        n = self.num_gaussians
        expected = {
            "means": (n, 3),
            "quats": (n, 4),
            "log_scales": (n, 3),
            "opacity_logits": (n,),
            "sh_dc": (n, 3),
        }
        if self.means.ndim != 2 or self.means.shape[1] != 3:
            raise ValueError(f"means must be [N, 3]; got {tuple(self.means.shape)}")
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} for N={n}; got {list(value.shape)}")
        if self.sh_rest.ndim != 3 or self.sh_rest.shape[0] != n or self.sh_rest.shape[2] != 3:
            raise ValueError(f"sh_rest must be [N, K-1, 3] for N={n}; got {list(self.sh_rest.shape)}")
        if _sh_degree_from_rest(int(self.sh_rest.shape[1])) < 0:
            raise ValueError(f"sh_rest has {self.sh_rest.shape[1]} coefficients; expected (d+1)^2 - 1 (0, 3, 8, 15..)")
        for name in (*expected, "sh_rest"):
            value = getattr(self, name)
            if not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor; got {value.dtype}")
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).reshape(n, -1).any(dim=1).sum()) if n else 0
                raise ValueError(f"{name} contains NaN or Inf values in {bad} of {n} Gaussians")
        for name, value in self.extras.items():
            if not _EXTRA_NAME.match(name):
                raise ValueError(f"extra name {name!r} must match [A-Za-z_][A-Za-z0-9_]* (it becomes a PLY property)")
            if not isinstance(value, Tensor):
                raise ValueError(f"extra {name!r} must be a torch.Tensor; got {type(value).__name__}")
            if value.ndim not in (1, 2) or value.shape[0] != n:
                raise ValueError(f"extra {name!r} must be [N] or [N, D] with N={n}; got {list(value.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"extra {name!r} contains NaN or Inf values")
        return self

    # ------------------------------------------------------------------ activations

    def scales(self) -> Tensor:
        """Standard deviations exp(log_scales) [N, 3]."""
        return torch.exp(self.log_scales)

    def opacities(self) -> Tensor:
        """Opacities sigmoid(opacity_logits) [N]."""
        return torch.sigmoid(self.opacity_logits)

    def normalized_quats(self) -> Tensor:
        """Unit quaternions wxyz [N, 4] (a zero quaternion stays zero instead of becoming NaN)."""
        return self.quats / self.quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def colors_sh(self) -> Tensor:
        """All SH coefficients [N, K, 3], DC first (the layout gsplat's ``rasterization`` takes)."""
        return torch.cat([self.sh_dc[:, None, :], self.sh_rest], dim=1)

    # ------------------------------------------------------------------ row and device operations

    def _map(self, fn) -> "GaussianScene":
        return GaussianScene(
            means=fn(self.means),
            quats=fn(self.quats),
            log_scales=fn(self.log_scales),
            opacity_logits=fn(self.opacity_logits),
            sh_dc=fn(self.sh_dc),
            sh_rest=fn(self.sh_rest),
            extras={k: fn(v) for k, v in self.extras.items()},
        )

    def to(self, device: Union[str, torch.device]) -> "GaussianScene":
        """A copy on ``device`` (tensors already there are shared, as ``Tensor.to`` does)."""
        return self._map(lambda t: t.to(device))

    def detach(self) -> "GaussianScene":
        """A view with every tensor detached from autograd."""
        return self._map(lambda t: t.detach())

    def clone(self) -> "GaussianScene":
        """A deep copy."""
        return self._map(lambda t: t.clone())

    def subset(self, index: Index) -> "GaussianScene":
        """The Gaussians selected by a bool mask [N], integer indices [M] or a slice; extras stay aligned."""
        n = self.num_gaussians
        if not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if not isinstance(index, Tensor) else index)
            index = index.to(self.device)
            if index.dtype == torch.bool:
                if index.shape != (n,):
                    raise ValueError(f"boolean mask must have shape [{n}]; got {list(index.shape)}")
            elif index.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
                index = index.reshape(-1).long()
                if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
                    raise ValueError(f"subset index out of range for {n} Gaussians")
            elif index.numel() == 0:
                index = index.long()
            else:
                raise ValueError(f"subset needs a bool mask or integer indices; got dtype {index.dtype}")
        return self._map(lambda t: t[index])

    @staticmethod
    def concatenate(scenes: Sequence["GaussianScene"]) -> "GaussianScene":
        """Stack scenes row-wise. All must share the SH degree and the extras (names, trailing shape, dtype)."""
        scenes = list(scenes)
        if not scenes:
            raise ValueError("concatenate needs at least one scene")
        first = scenes[0]
        for i, other in enumerate(scenes[1:], start=1):
            if other.sh_degree != first.sh_degree:
                raise ValueError(f"scene {i} has SH degree {other.sh_degree}; scene 0 has {first.sh_degree}")
            if set(other.extras) != set(first.extras):
                raise ValueError(f"scene {i} has extras {sorted(other.extras)}; scene 0 has {sorted(first.extras)}")
            for name, value in other.extras.items():
                ref = first.extras[name]
                if value.shape[1:] != ref.shape[1:] or value.dtype != ref.dtype:
                    raise ValueError(
                        f"extra {name!r} of scene {i} is {list(value.shape[1:])}/{value.dtype}; "
                        f"scene 0 has {list(ref.shape[1:])}/{ref.dtype}"
                    )

        def cat(get) -> Tensor:
            return torch.cat([get(s) for s in scenes], dim=0)

        return GaussianScene(
            means=cat(lambda s: s.means),
            quats=cat(lambda s: s.quats),
            log_scales=cat(lambda s: s.log_scales),
            opacity_logits=cat(lambda s: s.opacity_logits),
            sh_dc=cat(lambda s: s.sh_dc),
            sh_rest=cat(lambda s: s.sh_rest),
            extras={name: cat(lambda s, name=name: s.extras[name]) for name in first.extras},
        )

    # ------------------------------------------------------------------ splatfacto interop

    @classmethod
    def from_splatfacto_params(cls, params: Mapping[str, Tensor]) -> "GaussianScene":
        """Build from splatfacto's ``gauss_params`` (a ParameterDict or a plain dict of tensors).

        Keys ``means``, ``scales`` (log), ``quats``, ``features_dc``, ``opacities`` ([N, 1] or [N]) are required;
        ``features_rest`` [N, K-1, 3] is optional (degree 0 when absent). Every other key becomes an extra;
        an extra with more than two dims is flattened to [N, D]. Tensors are detached, not copied.
        """
        missing = [k for k in SPLATFACTO_KEYS if k != "features_rest" and k not in params]
        if missing:
            raise ValueError(f"splatfacto params lack {missing}; got keys {sorted(params)}")
        tensors = {k: torch.as_tensor(v).detach() for k, v in params.items()}
        means = tensors["means"]
        n = int(means.shape[0])
        opacities = tensors["opacities"]
        if opacities.ndim == 2 and opacities.shape[1] == 1:
            opacities = opacities[:, 0]
        rest = tensors.get("features_rest")
        if rest is None:
            rest = means.new_zeros(n, 0, 3)
        extras = {}
        for name, value in tensors.items():
            if name in SPLATFACTO_KEYS:
                continue
            extras[name] = value.reshape(n, -1) if value.ndim > 2 else value
        return cls(
            means=means,
            quats=tensors["quats"],
            log_scales=tensors["scales"],
            opacity_logits=opacities,
            sh_dc=tensors["features_dc"],
            sh_rest=rest,
            extras=extras,
        ).validate()

    def to_splatfacto_params(self, include_extras: bool = True) -> Dict[str, Tensor]:
        """splatfacto's ``gauss_params`` layout (``opacities`` as [N, 1]); extras are added under their own names
        unless ``include_extras`` is False (pass False to load into a plain ``SplatfactoModel``)."""
        params = {
            "means": self.means,
            "scales": self.log_scales,
            "quats": self.quats,
            "features_dc": self.sh_dc,
            "features_rest": self.sh_rest,
            "opacities": self.opacity_logits[:, None],
        }
        if include_extras:
            clash = set(self.extras) & set(params)
            if clash:
                raise ValueError(f"extras {sorted(clash)} clash with splatfacto parameter names")
            params.update(self.extras)
        return params
