"""RL3DEdit rewards (spec §3.5): a frozen 3D verifier scores a joint edit of M views; an anchor keeps 2D quality.

For one rollout with edited views ``I'_1..I'_M``, anchor index a and the anchor's reference edit ``Ĩ_a``:

- the verifier sees the edited views with view a *replaced* by ``Ĩ_a`` [P];
- ``r_D`` / ``r_P``: mean depth / world-point confidence over views and pixels [P Eq. 1], normalised (below) [I];
- ``r_T = exp(-(1/(M-1)) sum_m ||R_rel^m - R_rel^m*||_F^2 + ||t~_rel^m - t~_rel^m*||^2)`` between the verifier's and
  the source cameras' relative poses, translations at unit length [P Eq. 2];
- ``r_a = exp(-lambda LPIPS(I'_a, Ĩ_a))`` with lambda = 5 and LPIPS-VGG [I: lambda unpublished];
- ``R = sum_k w_k r_k / sum_k w_k`` over the available terms, all w = 0.25 [P]. With the paper's weights (sum 1) and
  all terms present this is exactly the paper's sum; a verifier without poses drops r_T and the rest is renormalised.

Confidence normalisation [I, spec §3.5: the paper does not say; raw VGGT confidences (>= 1, often several units)
would swamp r_T and r_a]: ``none`` (raw mean), ``log1p`` (mean of log1p(conf - 1)), ``ratio`` (default: mean
confidence of the edit over that of the unedited source views, clipped to [0, ratio_max = 1.5]; the source views
score exactly 1), ``clip`` (mean of clip(conf / conf_max, 0, 1)).

Verifiers:

- :class:`VGGTVerifier`: the paper's verifier (``facebook/VGGT-1B``; needs the GitHub ``vggt`` package and weights).
- :class:`ReprojectionVerifier`: an offline stand-in without weights [I]. It knows the scene: the source views' depth
  (rendered from the 3DGS) and cameras. Each edited view is compared with its neighbours (``neighbours`` places
  before and after it) warped into its pixels with its source depth; the per-pixel photometric error e
  (Monodepth2's 0.85 DSSIM + 0.15 L1, averaged over the valid warps of a pixel) becomes
  ``conf = 1 + conf_gain exp(-e / error_scale)`` in [1, 1 + conf_gain] (1 where no warp is valid), so it lives on
  VGGT's [1, inf) scale; depth and point confidence are the same map. It returns no pose estimate
  (``extrinsics=None``): echoing the known cameras would make r_T a constant 1, so r_T is skipped instead. Limits: it
  assumes the edit keeps the geometry (shape-changing edits lose reward) and, as the paper's warp-reward ablation
  warns, it can be reward-hacked towards blur; it is for tests and offline runs, not a substitute for VGGT.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Type

import torch
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.methods.rl3dedit.geometry import (
    DEFAULT_TAU,
    PH_SSIM_WEIGHT,
    ViewSet,
    pair_errors,
    relative_pose_errors,
)
from gsstudio_ext.models.perceptual import LpipsVggConfig, PerceptualConfig, PerceptualDistance
from gsstudio_ext.models.provider import Device
from gsstudio_ext.models.vggt import GeometryPrediction, VGGTConfig

NORMALIZATIONS = ("none", "log1p", "ratio", "clip")
TERMS = ("depth", "point", "pose", "anchor")


# ======================================================================================================================
# verifiers
# ======================================================================================================================
@dataclass
class GeometryVerifierConfig(InstantiateConfig):
    """Common settings of every geometry verifier."""

    _target: Type = field(default_factory=lambda: GeometryVerifier)


class GeometryVerifier(ABC):
    """Scores the 3D consistency of M views: per-view depth and confidence maps, optionally cameras."""

    provides_poses: bool = False
    """Whether :meth:`predict` estimates extrinsics (needed for the pose reward)."""

    def __init__(self, config: GeometryVerifierConfig, device: Device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    @abstractmethod
    def predict(self, images: Tensor, views: ViewSet) -> GeometryPrediction:
        """Geometry of ``images`` Float[M, 3, H, W] in [0, 1]; ``views`` are the source views (depth, cameras)."""

    def to(self, device: Device) -> "GeometryVerifier":
        self.device = torch.device(device)
        return self


@dataclass
class VGGTVerifierConfig(GeometryVerifierConfig):
    """VGGT-1B as the verifier (the paper's)."""

    _target: Type = field(default_factory=lambda: VGGTVerifier)
    vggt: VGGTConfig = field(default_factory=VGGTConfig)
    """VGGT weights and input settings."""


class VGGTVerifier(GeometryVerifier):
    provides_poses = True
    config: VGGTVerifierConfig

    def __init__(self, config: VGGTVerifierConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.provider = config.vggt.setup(device=device)

    def predict(self, images: Tensor, views: ViewSet) -> GeometryPrediction:
        return self.provider.predict(images)

    def to(self, device: Device) -> "VGGTVerifier":
        super().to(device)
        self.provider.to(device)
        return self


@dataclass
class ReprojectionVerifierConfig(GeometryVerifierConfig):
    """Offline verifier: photometric agreement of neighbouring views warped with the source depth and cameras [I]."""

    _target: Type = field(default_factory=lambda: ReprojectionVerifier)
    neighbours: int = 1
    """Each view is compared with the views up to this many places before and after it in the order."""
    tau: float = DEFAULT_TAU
    """Relative depth agreement for a valid warp (occlusion test) [I, as Ph-Loss]."""
    ssim_weight: float = PH_SSIM_WEIGHT
    """Weight of the DSSIM term in the per-pixel error (Monodepth2: 0.85)."""
    error_scale: float = 0.05
    """Error at which the confidence bonus falls to 1/e [I: about the Ph-Loss of consistent renders (0.02) to
    RL3DEdit's published 0.076]."""
    conf_gain: float = 4.0
    """Confidence of a perfect pixel minus 1 [I: a VGGT-like range of a few units]."""


class ReprojectionVerifier(GeometryVerifier):
    config: ReprojectionVerifierConfig

    def confidence(self, images: Tensor, views: ViewSet) -> Tensor:
        """Float[M, H, W] confidence 1 + gain exp(-err / scale) of ``images`` under the source geometry ``views``."""
        c = self.config
        views = views.with_images(images.to(views.device, views.images.dtype))
        m, device = len(views), views.device
        a_list, b_list = [], []
        for d in range(1, max(1, c.neighbours) + 1):
            idx = torch.arange(max(0, m - d), device=device)
            a_list += [idx, idx + d]
            b_list += [idx + d, idx]
        pairs = pair_errors(views, torch.cat(a_list), torch.cat(b_list), c.tau, c.ssim_weight)
        a_index = torch.cat(a_list)
        weight = pairs.valid.float()
        total = torch.zeros_like(views.depths).index_add_(0, a_index, pairs.error * weight)
        count = torch.zeros_like(views.depths).index_add_(0, a_index, weight)
        err = total / count.clamp_min(1.0)
        conf = 1.0 + c.conf_gain * torch.exp(-err / c.error_scale)
        return torch.where(count > 0, conf, torch.ones_like(conf))

    def predict(self, images: Tensor, views: ViewSet) -> GeometryPrediction:
        conf = self.confidence(images, views)
        return GeometryPrediction(views.depths, conf, conf.clone(), None, views.Ks)


# ======================================================================================================================
# reward terms
# ======================================================================================================================
def normalize_confidence(
    conf: Tensor,
    mode: str = "ratio",
    reference: Optional[Tensor] = None,
    ratio_max: float = 1.5,
    conf_max: float = 10.0,
) -> Tensor:
    """Confidence reward Float[] from maps Float[M, H, W] (>= 1): mean over views and pixels, normalised by ``mode``.

    ``reference`` (ratio mode): the raw mean confidence of the unedited source views.
    """
    if mode == "none":
        return conf.mean()
    if mode == "log1p":
        return torch.log1p((conf - 1.0).clamp_min(0.0)).mean()
    if mode == "ratio":
        if reference is None:
            raise ValueError("ratio normalisation needs the source views' mean confidence (reference)")
        return (conf.mean() / torch.as_tensor(reference, device=conf.device).clamp_min(1e-6)).clamp(0.0, ratio_max)
    if mode == "clip":
        return (conf / conf_max).clamp(0.0, 1.0).mean()
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def pose_reward(pred_viewmats: Tensor, gt_viewmats: Tensor) -> Tensor:
    """``r_T = exp(-mean_m (||R_rel - R_rel*||_F^2 + ||t~_rel - t~_rel*||^2))`` Float[] (spec §3.5, Eq. 2)."""
    return torch.exp(-relative_pose_errors(pred_viewmats.float(), gt_viewmats.float()).mean())


def anchor_reward(distance: Tensor, lam: float = 5.0) -> Tensor:
    """``r_a = exp(-lambda d)`` of perceptual distances d (any shape)."""
    return torch.exp(-lam * distance)


class SourceReference(NamedTuple):
    """The verifier's raw mean confidences of the unedited source views (ratio normalisation), per sample."""

    depth_conf: Tensor
    """Float[] mean depth confidence."""
    point_conf: Tensor
    """Float[] mean point confidence."""


@dataclass
class RewardConfig(InstantiateConfig):
    """Composite RL3DEdit reward: verifier, perceptual distance, normalisation and weights."""

    _target: Type = field(default_factory=lambda: RewardModel)
    verifier: GeometryVerifierConfig = field(default_factory=VGGTVerifierConfig)
    """Geometry verifier (vggt: the paper's; reprojection: offline, no weights, no pose reward)."""
    perceptual: PerceptualConfig = field(default_factory=LpipsVggConfig)
    """Perceptual distance of the anchor reward (LPIPS-VGG) [I]."""
    depth_weight: float = 0.25
    """w_D [P]."""
    point_weight: float = 0.25
    """w_P [P]."""
    pose_weight: float = 0.25
    """w_T [P]."""
    anchor_weight: float = 0.25
    """w_a [P]."""
    anchor_lambda: float = 5.0
    """lambda in r_a = exp(-lambda LPIPS) [I: unpublished]."""
    normalization: str = "ratio"
    """Confidence normalisation: none | log1p | ratio | clip [I: unpublished; ratio is a documented deviation]."""
    ratio_max: float = 1.5
    """Upper clip of the ratio normalisation [I]."""
    conf_max: float = 10.0
    """Confidence mapped to 1 by the clip normalisation [I]."""


class RewardModel:
    """Computes the RL3DEdit rewards of a group of rollouts; holds the verifier and the perceptual distance."""

    def __init__(
        self,
        config: RewardConfig,
        device: Device = "cpu",
        verifier: Optional[GeometryVerifier] = None,
        perceptual: Optional[PerceptualDistance] = None,
    ) -> None:
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
        weights = self.weights_of(config)
        if min(weights.values()) < 0:
            raise ValueError(f"reward weights must be >= 0, got {weights}")
        self.config = config
        self.device = torch.device(device)
        self.verifier = verifier if verifier is not None else config.verifier.setup(device=device)
        self.perceptual = perceptual if perceptual is not None else config.perceptual.setup(device=device)

    @staticmethod
    def weights_of(config: RewardConfig) -> Dict[str, float]:
        return {
            "depth": config.depth_weight,
            "point": config.point_weight,
            "pose": config.pose_weight,
            "anchor": config.anchor_weight,
        }

    @torch.no_grad()
    def reference(self, views: ViewSet) -> SourceReference:
        """Run the verifier once on the unedited source views (cache it per sample and pass it to __call__)."""
        views = views.to(self.device)
        pred = self.verifier.predict(views.images, views)
        return SourceReference(pred.depth_conf.float().mean(), pred.point_conf.float().mean())

    @torch.no_grad()
    def geometry_terms(
        self, images: Tensor, views: ViewSet, reference: Optional[SourceReference] = None
    ) -> Dict[str, Tensor]:
        """r_D, r_P, r_T (NaN without poses) and the raw mean confidences of one view set Float[M, 3, H, W]."""
        c = self.config
        pred = self.verifier.predict(images, views)
        ref_d = ref_p = None
        if c.normalization == "ratio":
            reference = reference if reference is not None else self.reference(views)
            ref_d, ref_p = reference.depth_conf, reference.point_conf
        nan = torch.tensor(float("nan"), device=self.device)
        pose = nan if pred.extrinsics is None else pose_reward(pred.extrinsics.to(self.device), views.viewmats)
        return {
            "depth": normalize_confidence(pred.depth_conf.float(), c.normalization, ref_d, c.ratio_max, c.conf_max),
            "point": normalize_confidence(pred.point_conf.float(), c.normalization, ref_p, c.ratio_max, c.conf_max),
            "pose": pose.to(self.device),
            "depth_conf": pred.depth_conf.float().mean(),
            "point_conf": pred.point_conf.float().mean(),
        }

    def combine(self, terms: Dict[str, Tensor]) -> Tensor:
        """Weighted mean over the available (non-NaN) terms of ``depth, point, pose, anchor`` (each Float[G])."""
        weights = self.weights_of(self.config)
        num = torch.zeros_like(terms["anchor"])
        den = torch.zeros_like(terms["anchor"])
        for name in TERMS:
            value = terms[name]
            ok = ~value.isnan()
            num = num + torch.where(ok, weights[name] * value, torch.zeros_like(value))
            den = den + ok.float() * weights[name]
        if bool((den <= 0).any()):
            raise ValueError(f"no reward term with a positive weight is available (weights {weights})")
        return num / den

    @torch.no_grad()
    def __call__(
        self,
        edited: Tensor,
        anchor_index: int,
        anchor_image: Tensor,
        views: ViewSet,
        reference: Optional[SourceReference] = None,
    ) -> Dict[str, Tensor]:
        """Rewards of G rollouts.

        Args:
            edited: Float[G, M, 3, H, W] (or [M, 3, H, W] for one rollout) edited views in [0, 1].
            anchor_index: a, shared by the group.
            anchor_image: Float[3, H, W] the reference edit Ĩ_a of the anchor view.
            views: the source views (images, rendered depth, cameras) in the same order.
            reference: :meth:`reference` of ``views`` (ratio normalisation); computed here when None.

        Returns:
            ``reward`` (composite), ``depth``, ``point``, ``pose`` (NaN without poses), ``anchor``, ``lpips``,
            ``depth_conf`` and ``point_conf`` (raw means), each Float[G] (Float[] for a single rollout).
        """
        single = edited.ndim == 4
        edited = (edited[None] if single else edited).to(self.device, torch.float32)
        g, m = edited.shape[:2]
        if edited.ndim != 5 or edited.shape[2] != 3 or m != len(views):
            raise ValueError(f"edited must be [G, M={len(views)}, 3, H, W], got {tuple(edited.shape)}")
        if not 0 <= anchor_index < m:
            raise ValueError(f"anchor_index {anchor_index} is outside 0..{m - 1}")
        if anchor_image.shape != edited.shape[2:]:
            raise ValueError(f"anchor_image must be {tuple(edited.shape[2:])}, got {tuple(anchor_image.shape)}")
        views = views.to(self.device)
        anchor_image = anchor_image.to(self.device, torch.float32)
        if self.config.normalization == "ratio" and reference is None:
            reference = self.reference(views)
        geometry_input = edited.clone()
        geometry_input[:, anchor_index] = anchor_image
        per_rollout = [self.geometry_terms(geometry_input[i], views, reference) for i in range(g)]
        terms = {k: torch.stack([t[k] for t in per_rollout]) for k in per_rollout[0]}
        terms["lpips"] = self.perceptual.distance(edited[:, anchor_index], anchor_image[None]).to(self.device)
        terms["anchor"] = anchor_reward(terms["lpips"], self.config.anchor_lambda)
        terms["reward"] = self.combine(terms)
        return {k: (v[0] if single else v) for k, v in terms.items()}
