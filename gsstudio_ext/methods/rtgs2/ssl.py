"""RT-GS2 Stage A: self-supervised per-Gaussian features, PointContrast style (spec §4.3).

One training sample is a mined view pair (``pairs.ViewPair``): the scene is voxel-subsampled, each view keeps the
subsampled Gaussians it sees, each view's copy is augmented independently, both go through the backbone in one
batched forward (``batch`` 0 / 1), and PointInfoNCE pulls the two features of every shared Gaussian together while
every other sampled key acts as a negative.

Input per Gaussian (10 channels): xyz (3), RGB from the SH DC term (3), opacity (1), log-scales (3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import SH_C0
from gsstudio_ext.methods.rtgs2.pairs import ViewPair

NUM_INPUT_CHANNELS = 10
"""xyz, rgb, opacity, log-scales."""

ProgressFn = Callable[[int, Dict[str, float]], None]


@dataclass
class SSLConfig:
    """Stage A sample construction, loss and optimiser (official values unless a field says otherwise)."""

    voxel_size: float = 0.07
    """Voxel edge for subsampling the scene (one random Gaussian per voxel), in scene units (metres)."""
    max_correspondences: int = 4096
    """At most this many correspondences are sampled per pair for the InfoNCE loss."""
    temperature: float = 0.07
    """InfoNCE temperature tau."""
    normalize: bool = True
    """L2-normalise features before the similarity (official: False; spec §4.9.4 suggests normalising)."""
    scale_range: Tuple[float, float] = (0.6, 1.2)
    """Uniform scale augmentation range; xyz is multiplied by s and log(s) is added to the log-scales (the
    official code multiplies the log-scales by s, which is not a scaling of the Gaussians)."""
    rotation_axis: Literal["random", "z"] = "random"
    """Axis of the rotation augmentation: a random one (official) or the up axis z, for gravity-aligned scenes
    (indoor rooms, tabletops), where features need not be invariant to tilting."""
    jitter: float = 0.02
    """Std of the Gaussian noise added to colour and opacity (then clipped to [0, 1])."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-5
    """Adam weight decay (L2, as torch.optim.Adam applies it)."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 disables it."""


class PairSample(NamedTuple):
    """Both views of one pair, ready for one batched backbone forward (M = M1 + M2 rows)."""

    coords: Tensor  # [M, 3] augmented, centred positions
    feats: Tensor  # [M, 10] inputs (xyz channels = coords)
    batch: Tensor  # Long[M]: 0 = first view's subset (rows 0..M1-1), 1 = second view's
    query: Tensor  # Long[K]: rows of the first view, one per correspondence
    key: Tensor  # Long[K]: rows of the second view holding the same Gaussians, in the same order
    ids: Tensor  # Long[M]: scene index of the Gaussian behind each row


def gaussian_inputs(scene: GaussianScene, index: Optional[Tensor] = None) -> Tensor:
    """Float [M, 10] backbone inputs of the Gaussians ``index`` (all N when None), detached from the scene.

    Channels: xyz, RGB = clamp(SH_C0 * dc + 0.5, 0, 1), sigmoid opacity, raw log-scales. The official code instead
    min-max normalises RGB over each view's subset, which makes colours incomparable across views (spec §4.8);
    clamping keeps the colour of a Gaussian identical in every view and scene.
    """
    if index is not None:
        scene = scene.subset(index)
    rgb = (SH_C0 * scene.sh_dc + 0.5).clamp(0.0, 1.0)
    feats = torch.cat([scene.means, rgb, scene.opacities()[:, None], scene.log_scales], dim=1)
    return feats.detach()


def voxel_subsample(points: Tensor, voxel_size: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Long [S]: sorted ids of one randomly chosen point per occupied voxel of edge ``voxel_size``."""
    n = points.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    if voxel_size <= 0:
        raise ValueError(f"voxel_subsample: voxel_size must be > 0, got {voxel_size}")
    perm = torch.randperm(n, generator=generator).to(points.device)
    cells = torch.floor(points.detach()[perm] / voxel_size).long()
    cells = cells - cells.amin(dim=0)
    dims = cells.amax(dim=0) + 1
    keys = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(n, device=points.device)
    first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=points.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # first point of each voxel in perm order
    return perm[first].sort().values


def _rotation(axis: Tensor, angle: float) -> Tensor:
    """[3, 3] rotation by ``angle`` radians about the unit vector ``axis`` (Rodrigues)."""
    x, y, z = axis.tolist()
    skew = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=axis.dtype)
    eye = torch.eye(3, dtype=axis.dtype)
    return eye + math.sin(angle) * skew + (1.0 - math.cos(angle)) * (skew @ skew)


def augment_view(feats: Tensor, config: SSLConfig, generator: Optional[torch.Generator] = None) -> Tensor:
    """Float [m, 10]: one view's inputs centred, then scaled by s ~ U(scale_range) and rotated about a random axis
    (or z, see ``rotation_axis``) by an angle in (-180, 180) degrees (xyz), log(s) added to the log-scales, and
    colour and opacity jittered and clipped to [0, 1]. Random numbers come from ``generator`` (CPU)."""
    m = feats.shape[0]
    out = feats.clone()
    if m == 0:
        return out
    lo, hi = config.scale_range
    scale = lo + (hi - lo) * float(torch.rand(1, generator=generator))
    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    if config.rotation_axis == "z":
        axis = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    axis = axis / axis.norm().clamp_min(1e-12)
    angle = (2.0 * float(torch.rand(1, generator=generator)) - 1.0) * math.pi
    rot = _rotation(axis, angle).to(feats)
    xyz = feats[:, :3] - feats[:, :3].mean(dim=0)
    out[:, :3] = scale * (xyz @ rot.T)
    noise = torch.randn(m, 4, generator=generator).to(feats) * config.jitter
    out[:, 3:7] = (feats[:, 3:7] + noise).clamp(0.0, 1.0)
    out[:, 7:10] = feats[:, 7:10] + math.log(scale)
    return out


def make_pair_sample(
    scene: GaussianScene,
    pair: ViewPair,
    config: SSLConfig,
    generator: Optional[torch.Generator] = None,
) -> PairSample:
    """Voxel-subsample the whole scene, keep each view's visible part, re-index the correspondences and augment
    each view independently (see ``augment_view``). ``generator`` is a CPU generator (None: the global RNG)."""
    device = scene.device
    n = scene.num_gaussians
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    kept[voxel_subsample(scene.means, config.voxel_size, generator)] = True
    vis1 = pair.visible_first.to(device) & kept
    vis2 = pair.visible_second.to(device) & kept
    ids1, ids2 = vis1.nonzero()[:, 0], vis2.nonzero()[:, 0]
    m1 = ids1.shape[0]

    # rows of each scene id in the two views (-1: absent)
    row1 = torch.full((n,), -1, dtype=torch.long, device=device)
    row2 = torch.full((n,), -1, dtype=torch.long, device=device)
    row1[ids1] = torch.arange(m1, device=device)
    row2[ids2] = torch.arange(ids2.shape[0], device=device) + m1
    corr = pair.correspondences.to(device).long()
    corr = corr[(row1[corr] >= 0) & (row2[corr] >= 0)]

    feats1 = augment_view(gaussian_inputs(scene, ids1), config, generator)
    feats2 = augment_view(gaussian_inputs(scene, ids2), config, generator)
    feats = torch.cat([feats1, feats2], dim=0)
    batch = torch.cat([torch.zeros(m1, dtype=torch.long), torch.ones(ids2.shape[0], dtype=torch.long)]).to(device)
    return PairSample(
        coords=feats[:, :3].contiguous(),
        feats=feats,
        batch=batch,
        query=row1[corr],
        key=row2[corr],
        ids=torch.cat([ids1, ids2]),
    )


def point_info_nce(
    features: Tensor,
    query: Tensor,
    key: Tensor,
    temperature: float = 0.07,
    normalize: bool = True,
    max_pairs: int = 4096,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """PointInfoNCE over at most ``max_pairs`` randomly sampled correspondences (query[i], key[i]).

    With Q = features[query], K = features[key] (rows L2-normalised when ``normalize``):
    L = CrossEntropy((Q K^T) / temperature, diag). Every other sampled key is a negative.

    Args:
        features: [M, D] backbone output for all rows of the sample.
        query, key: Long [P] rows of the two views that hold the same Gaussian.
    Returns:
        (loss, top-1 match accuracy): scalars; accuracy = share of queries whose most similar key is their own.
        With no correspondences the loss is 0 (still attached to ``features``) and the accuracy 0.
    """
    if query.shape != key.shape or query.dim() != 1:
        raise ValueError(f"point_info_nce: query and key must be equal-length 1-D, got {query.shape}, {key.shape}")
    if query.numel() == 0:
        return features.sum() * 0.0, features.new_zeros(())
    if query.numel() > max_pairs:
        pick = torch.randperm(query.numel(), generator=generator)[:max_pairs].to(query.device)
        query, key = query[pick], key[pick]
    q, k = features[query], features[key]
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = (q @ k.T) / temperature
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.detach().argmax(dim=1) == target).float().mean()
    return loss, accuracy


def ssl_loss(
    backbone: nn.Module,
    scene: GaussianScene,
    pair: ViewPair,
    config: SSLConfig,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """One Stage A step's losses for one pair: {"contrastive": loss, "match_accuracy": top-1 accuracy (detached)}.

    ``backbone(coords [M, 3], feats [M, 10], batch Long[M]) -> [M, D]``; both views go through one forward.
    """
    sample = make_pair_sample(scene, pair, config, generator)
    features = backbone(sample.coords, sample.feats, sample.batch)
    loss, accuracy = point_info_nce(
        features, sample.query, sample.key, config.temperature, config.normalize, config.max_correspondences, generator
    )
    return {"contrastive": loss, "match_accuracy": accuracy.detach()}


def _rich_progress(steps: int):
    """(callback, close) showing a rich progress bar, as nerfstudio does for long work."""
    from rich.progress import Progress

    bar = Progress()
    bar.start()
    task = bar.add_task("RT-GS2 SSL", total=steps)

    def update(step: int, metrics: Dict[str, float]) -> None:
        text = f"RT-GS2 SSL loss {metrics['contrastive']:.3f} acc {metrics['match_accuracy']:.2f}"
        bar.update(task, completed=step + 1, description=text)

    return update, bar.stop


def train_backbone(
    backbone: nn.Module,
    scenes: Sequence[Tuple[GaussianScene, Sequence[ViewPair]]],
    steps: int,
    config: Optional[SSLConfig] = None,
    generator: Optional[torch.Generator] = None,
    progress: Union[bool, ProgressFn, None] = None,
) -> List[float]:
    """Train ``backbone`` in place with PointInfoNCE; returns the loss of every step.

    Each step draws a scene uniformly (among those with pairs), then one of its pairs uniformly (batch = 1 pair, as
    the official code), and takes one Adam step with gradient-norm clipping. ``progress``: True shows a rich bar; a
    callable gets ``(step, {"contrastive": float, "match_accuracy": float})`` after every step. The module's
    training flag is restored at the end. The scenes must be on the backbone's device.
    """
    config = config or SSLConfig()
    pool = [(scene, list(pairs)) for scene, pairs in scenes if len(pairs) > 0]
    if not pool:
        raise ValueError("train_backbone: no scene has any mined pair; mine pairs first (rtgs2.pairs.mine_pairs)")
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    callback: Optional[ProgressFn] = None
    close: Callable[[], None] = lambda: None  # noqa: E731
    if progress is True:
        callback, close = _rich_progress(steps)
    elif callable(progress):
        callback = progress

    was_training = backbone.training
    backbone.train()
    losses: List[float] = []
    try:
        for step in range(steps):
            scene, pairs = pool[int(torch.randint(len(pool), (1,), generator=generator))]
            pair = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
            out = ssl_loss(backbone, scene, pair, config, generator)
            optimizer.zero_grad(set_to_none=True)
            out["contrastive"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            metrics = {name: float(value.detach()) for name, value in out.items()}
            losses.append(metrics["contrastive"])
            if callback is not None:
                callback(step, metrics)
    finally:
        backbone.train(was_training)
        close()
    return losses
