"""RoMaP Stage A (3D-GALP): label fitting contract on a tiny scene, the naive baseline on constructed input, and the
acceptance test on a gs-synth scene: part mIoU in held-out views from noisy part targets, against the baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import Tensor

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.ply import read_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.methods.romap.galp import GALPConfig, OutlierViews, fit_part_labels, naive_label_average
from gsstudio_ext.methods.romap.labels import labels_to_sh, part_map_2d, render_label_field
from gsstudio_ext.methods.romap.part_targets import (
    PartTargetSource,
    PartTargetSourceConfig,
    SidecarPartTargetsConfig,
)


class FixedTargets(PartTargetSource):
    """The same target for every view (for contract tests)."""

    def __init__(self, target: Tensor, num_views: int) -> None:
        super().__init__(PartTargetSourceConfig(seg_list=(("a",), ("b",))))
        self.target, self._views = target, num_views

    @property
    def num_views(self) -> int:
        return self._views

    def targets(self, view_index: int) -> Tensor:
        return self.target


def _look_at(center: Tuple[float, float, float]) -> Tensor:
    c = torch.tensor(center)
    fwd = -c / c.norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    rot = torch.stack([right, torch.linalg.cross(fwd, right), fwd])
    view = torch.eye(4)
    view[:3, :3], view[:3, 3] = rot, -rot @ c
    return view


def _tiny_scene() -> Tuple[GaussianScene, Tensor, Tensor]:
    torch.manual_seed(0)
    scene = GaussianScene.random(300, seed=0)
    scene.log_scales = torch.full((300, 3), -2.0)
    scene.opacity_logits = torch.full((300,), 3.0)
    viewmats = torch.stack([_look_at((1.5, 0.2 * i, 0.5)) for i in range(3)])
    Ks = torch.tensor([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]).expand(3, 3, 3).contiguous()
    return scene, viewmats, Ks


def test_fit_only_optimises_labels_lowers_loss_and_is_deterministic():
    scene, viewmats, Ks = _tiny_scene()
    before = scene.clone()
    target = torch.zeros(3, 32, 32)
    target[0, :, :16] = 1.0  # left half red, right half green
    target[1, :, 16:] = 1.0
    source = FixedTargets(target, num_views=3)
    losses = []
    seg_only = GALPConfig(steps=40, sh_degree=1, neighbour_weight=0.0, lr_dc=0.05)
    sh = fit_part_labels(scene, viewmats, Ks, 32, 32, source, seg_only, progress=lambda s, n, loss: losses.append(loss))
    assert sh.shape == (300, 4, 3) and not sh.requires_grad
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    print(f"tiny fit: L_seg {sum(losses[:5]) / 5:.2f} -> {sum(losses[-5:]) / 5:.2f}")
    config = GALPConfig(steps=30, sh_degree=1, neighbour_start=10, softness_every=10, num_anchors=50, k=5, lr_dc=0.05)
    sh = fit_part_labels(scene, viewmats, Ks, 32, 32, source, config)
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest"):
        assert torch.equal(getattr(scene, name), getattr(before, name))
    again = fit_part_labels(scene, viewmats, Ks, 32, 32, source, config)
    assert torch.equal(sh, again)
    other = fit_part_labels(scene, viewmats, Ks, 32, 32, source, GALPConfig(**{**config.__dict__, "seed": 1}))
    assert not torch.equal(sh, other)
    with pytest.raises(ValueError, match="target source has 3 views"):
        fit_part_labels(scene, viewmats.repeat(2, 1, 1), Ks.repeat(2, 1, 1), 32, 32, source, config)


def test_naive_label_average_visibility_and_majority():
    # A camera at the origin looking down +z; Gaussian 0 at pixel (16, 16), 1 hidden behind it, 2 at its own pixel
    # (21, 16), 3 outside the image, 4 behind the camera
    means = torch.tensor([[0.05, 0.05, 2], [0.1, 0.1, 4], [0.55, 0.05, 2], [50.0, 0, 2], [0.0, 0, -2]])
    n = means.shape[0]
    scene = GaussianScene(
        means=means,
        quats=torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
        log_scales=torch.full((n, 3), -2.0),
        opacity_logits=torch.full((n,), 6.0),
        sh_dc=torch.zeros(n, 3),
        sh_rest=torch.zeros(n, 0, 3),
    )
    viewmats = torch.eye(4).repeat(3, 1, 1)
    Ks = torch.tensor([[20.0, 0, 16], [0, 20.0, 16], [0, 0, 1]]).expand(3, 3, 3).contiguous()
    maps = torch.ones(3, 32, 32, dtype=torch.long)
    maps[1:] = 2  # votes at (16, 16): 1, 2, 2 -> 2
    maps[:, 16, 21] = torch.tensor([3, 3, 1])  # Gaussian 2 projects to (21, 16): 3, 3, 1 -> 3
    labels = naive_label_average(scene, viewmats, Ks, 32, 32, maps, num_parts=3)
    assert labels.tolist() == [2, 0, 3, 0, 0]


def test_outlier_views_trim_a_disagreeing_view_until_it_agrees():
    trim = OutlierViews(3, factor=1.5)
    seg = torch.tensor(4.0, requires_grad=True)
    assert trim(0, seg) is seg and trim(1, torch.tensor(1.0)).item() == 1.0  # until every view has a loss
    assert trim(2, torch.tensor(1.25)).item() == 1.25
    assert trim(0, seg).item() == 0.0 and trim.outliers == [0]  # 4 > 1.5 x median 1.25
    trimmed = trim(0, seg)
    trimmed.backward()
    assert seg.grad.item() == 0.0  # no gradient from a trimmed view
    assert trim(0, torch.tensor(1.5)).item() == 1.5 and trim.outliers == []  # back once the field explains it
    assert OutlierViews(2, None)(0, seg) is seg


# ====================================================================================================== acceptance
SEG_LIST = (("body",), ("lid",))
NOISE = dict(boundary_px=2, flip_prob=0.2, seed=0)
"""Target noise of the acceptance test (the model's defaults): per view and part an erosion or dilation of radius
0-2 px, and whole-view body/lid swaps in 20 % of the views (4 of 18 with seed 0); the noisy train maps score mIoU
0.52 against the clean ones. Measured on this scene (300 steps), GALP / naive averaging: this noise 0.830 / 0.798,
noise seed 1 0.791 / 0.781, seed 2 0.822 / 0.770; boundary noise only 0.841 / 0.827; clean 0.870 / 0.809. Without
trimming outlier views (outlier_factor=None) this noise gives 0.778: per-channel L1 to one-hot colours takes the
median per channel, which turns three-way splits (part, other part, eroded gap) black, where the vote keeps the mode.
"""
GALP = GALPConfig(steps=300, lr_dc=0.025, num_anchors=100, k=5)
"""Spec values except: half the steps at twice the DC rate (the same result here, half the time), and anchors /
neighbours scaled down to a scene of ~7k Gaussians (K = 1000, k = 50 would tie most Gaussians of so small a scene
together)."""


def _cameras(root: Path, split: str) -> Tuple[Tensor, Tensor]:
    meta = json.loads((root / "transforms.json").read_text())
    frames = {f["file_path"]: f for f in meta["frames"]}
    c2w = torch.tensor([frames[f]["transform_matrix"] for f in meta[f"{split}_filenames"]], dtype=torch.float32)
    K = torch.tensor([[meta["fl_x"], 0.0, meta["cx"]], [0.0, meta["fl_y"], meta["cy"]], [0.0, 0.0, 1.0]])
    return viewmat_from_c2w(c2w), K.expand(c2w.shape[0], 3, 3).contiguous()


def part_miou(pred: Tensor, gt: Tensor, num_parts: int) -> Tuple[float, list]:
    """Mean over parts 1..P (background excluded) of IoU pooled over all views (intersections and unions summed)."""
    ious = []
    for j in range(1, num_parts + 1):
        inter = int(((pred == j) & (gt == j)).sum())
        union = int(((pred == j) | (gt == j)).sum())
        ious.append(inter / union if union else 1.0)
    return sum(ious) / len(ious), ious


@pytest.fixture(scope="module")
def box_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gsstudio_ext.data.synthetic import SynthConfig, generate_scene

    config = SynthConfig(
        seed=6, width=96, height=96, num_objects=2, num_views=24, eval_every=4, fuse_gaussians=True
    )  # two boxes (parts body + lid); 18 train and 6 held-out test views
    return generate_scene(tmp_path_factory.mktemp("romap") / "boxes", config)


def test_galp_beats_naive_averaging_on_held_out_views(box_scene: Path):
    torch.manual_seed(0)
    root = box_scene
    meta = json.loads((root / "sidecars" / "scene.json").read_text())
    scene = read_ply(root / "gaussians.ply")
    # Region of interest: the Gaussians within 5 mm of the objects (the far table renders black = background)
    keep = torch.zeros(scene.num_gaussians, dtype=torch.bool)
    for obj in meta["objects"]:
        lo, hi = torch.tensor(obj["bbox_min"]) - 0.005, torch.tensor(obj["bbox_max"]) + 0.005
        keep |= ((scene.means >= lo) & (scene.means <= hi)).all(dim=1)
    scene = scene.subset(keep)
    train_vm, train_K = _cameras(root, "train")
    test_vm, test_K = _cameras(root, "test")
    targets = SidecarPartTargetsConfig(dataset=root, seg_list=SEG_LIST, split="train", **NOISE).setup()
    truth = SidecarPartTargetsConfig(dataset=root, seg_list=SEG_LIST, split="test", noise=False).setup()
    assert targets.num_views == 18 and truth.num_views == 6

    losses = []
    label_sh = fit_part_labels(scene, train_vm, train_K, 96, 96, targets, GALP, lambda s, n, loss: losses.append(loss))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.65 * first  # the trimmed swapped views count 0

    noisy_maps = torch.stack([targets.noisy_labels(v) for v in range(18)])
    clean = SidecarPartTargetsConfig(dataset=root, seg_list=SEG_LIST, split="train", noise=False).setup()
    assert part_miou(noisy_maps, torch.stack([clean.gt_labels(v) for v in range(18)]), 2)[0] < 0.6  # 0.52: it is noisy
    naive = naive_label_average(scene, train_vm, train_K, 96, 96, noisy_maps, targets.num_parts)
    gt = torch.stack([truth.gt_labels(v) for v in range(6)])
    protos = targets.prototypes
    galp_pred = part_map_2d(render_label_field(scene, label_sh, test_vm, test_K, 96, 96), protos)
    naive_sh = labels_to_sh(naive, protos, GALP.sh_degree)
    naive_pred = part_map_2d(render_label_field(scene, naive_sh, test_vm, test_K, 96, 96), protos)
    galp_miou, galp_ious = part_miou(galp_pred, gt, targets.num_parts)
    naive_miou, naive_ious = part_miou(naive_pred, gt, targets.num_parts)
    print(f"L_A {first:.2f} -> {last:.2f}; part mIoU GALP {galp_miou:.3f} {galp_ious}")
    print(f"part mIoU naive averaging {naive_miou:.3f} {naive_ious}")
    assert galp_miou >= 0.8  # observed 0.830
    assert galp_miou > naive_miou  # observed naive 0.798
