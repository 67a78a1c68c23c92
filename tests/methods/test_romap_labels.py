"""RoMaP label field, mask rules, part targets, softness, neighbour loss and the sidecar noise model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gsstudio_ext.core.masks import dilate_mask
from gsstudio_ext.core.sh import sh_basis
from gsstudio_ext.data.sidecars import write_parts, write_scene_meta
from gsstudio_ext.methods.romap.galp import knn_indices, neighbour_loss, softness
from gsstudio_ext.methods.romap.labels import (
    PROTOTYPE_COLORS,
    assign_parts_3d,
    init_label_sh,
    label_colors,
    labels_to_sh,
    part_map_2d,
    part_prototypes,
)
from gsstudio_ext.methods.romap.part_targets import SidecarPartTargetsConfig, compose_part_target


def _viewmat(center: torch.Tensor) -> torch.Tensor:
    """World-to-camera [4, 4] of a camera at ``center`` looking at the origin (z forward, OpenCV)."""
    fwd = -center / center.norm()
    up = torch.tensor([0.0, 0.0, 1.0]) if abs(float(fwd[2])) < 0.9 else torch.tensor([0.0, 1.0, 0.0])
    right = torch.linalg.cross(fwd, up)
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    rot = torch.stack([right, down, fwd])
    view = torch.eye(4)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ center
    return view


def _ring(num: int, radius: float = 3.0) -> torch.Tensor:
    angles = torch.arange(num) * (2 * math.pi / num)
    centers = torch.stack([radius * torch.cos(angles), radius * torch.sin(angles), torch.full((num,), 1.0)], dim=1)
    return torch.stack([_viewmat(c) for c in centers])


# ---------------------------------------------------------------------------------------------------------- labels
def test_prototypes_fixed_then_seeded_random():
    protos = part_prototypes(8, seed=3)
    assert protos.shape == (9, 3)
    assert torch.equal(protos[0], torch.zeros(3))
    assert torch.equal(protos[1:7], torch.tensor(PROTOTYPE_COLORS))
    assert torch.equal(protos[1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(protos[6], torch.tensor([1.0, 0.0, 1.0]))
    assert bool(((protos[7:] >= 0) & (protos[7:] <= 1)).all())
    assert torch.equal(protos, part_prototypes(8, seed=3))
    assert not torch.equal(protos[7:], part_prototypes(8, seed=4)[7:])
    assert torch.equal(part_prototypes(2), torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]))


def test_init_label_sh_renders_mid_grey_from_every_view():
    sh = init_label_sh(5, degree=3)
    assert sh.shape == (5, 16, 3)
    assert torch.equal(sh[:, 1:], torch.zeros(5, 15, 3))
    colors = label_colors(torch.randn(5, 3), sh, _ring(4), degree=3)
    assert torch.allclose(colors, torch.full((4, 5, 3), 0.5))
    grey = label_colors(torch.zeros(1, 3), init_label_sh(1, 0, init_color=0.2), _ring(1), 0)
    assert torch.allclose(grey, torch.tensor(0.2))


def test_label_colors_formula_and_clamp():
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.1, 0.3]])
    sh = torch.randn(2, 4, 3)
    viewmats = _ring(3)
    colors = label_colors(means, sh, viewmats, degree=1)
    centers = torch.linalg.inv(viewmats)[:, :3, 3]
    for c in range(3):
        dirs = means - centers[c]
        expected = (sh_basis(1, dirs)[:, :, None] * sh).sum(dim=1) + 0.5
        assert torch.allclose(colors[c], expected.clamp_min(0.0), atol=1e-5)
    assert float(colors.min()) >= 0.0 and bool((colors == 0).any())  # randn coefficients hit the clamp somewhere


def test_labels_to_sh_round_trips_through_assign_parts_3d():
    protos = part_prototypes(7)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3])
    sh = labels_to_sh(labels, protos, degree=2)
    colors = label_colors(torch.randn(9, 3), sh, _ring(3), degree=2)
    assert torch.allclose(colors, protos[labels][None].expand(3, -1, -1), atol=1e-6)
    hard = assign_parts_3d(colors[0], protos)
    assert torch.equal(hard[:7], labels[:7]) and hard[8].item() == 3
    # the seeded 7th colour lies within L1 1.0 of part 4's (1, 1, 0): exclusive order gives it to part 4
    assert (protos[7] - protos[4]).abs().sum() < 1.0 and hard[7].item() == 4


def test_assign_parts_3d_threshold_and_list_order():
    protos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.8, 0.2, 0.0]])
    colors = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.0], [0.55, 0.0, 0.0]])
    # L1 to l_1: 0.2, 0.4, 2.0, 0.8, 0.45; to l_2: 0.2, 0.0, 1.8, 0.8, 0.45; to black: 1.0, 1.0, 1.0, 0.2, 0.55
    assert assign_parts_3d(colors, protos).tolist() == [1, 1, 0, 0, 1]  # both match -> the earlier part
    swapped = protos[[0, 2, 1]]
    assert assign_parts_3d(colors, swapped).tolist() == [1, 1, 0, 0, 1]
    assert assign_parts_3d(colors, protos, threshold=0.3).tolist() == [1, 2, 0, 0, 0]
    # the near-black label (0.2, 0, 0) is within 1.0 of red, but closer to the background: only the bare rule takes it
    assert assign_parts_3d(colors, protos, exclude_background=False).tolist() == [1, 1, 0, 1, 1]


def test_part_map_2d_threshold_order_and_black_background():
    protos = part_prototypes(3)
    image = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
            [[0.8, 0.8, 0.0], [0.7, 0.6, 0.0], [0.6, 0.2, 0.3]],
        ]
    )
    # (0.8, 0.8, 0): mean distance 0.33 to red and to green -> red (earlier); (0.7, 0.6, 0): red 0.3, green 0.37 -> red
    # (0.6, 0.2, 0.3): red 0.3, green 0.57, blue 0.5 -> red
    assert part_map_2d(image, protos).tolist() == [[1, 2, 0], [1, 1, 1]]
    assert part_map_2d(image, protos[[0, 2, 1, 3]]).tolist() == [[2, 1, 0], [1, 2, 2]]
    assert part_map_2d(image, protos, threshold=0.2).tolist() == [[1, 2, 0], [0, 0, 0]]
    # black is 1/3 < 0.34 from every primary prototype: the bare rule makes background part 1
    assert part_map_2d(image, protos, exclude_background=False)[0, 2].item() == 1
    assert part_map_2d(torch.zeros(2, 4, 5, 3), protos).shape == (2, 4, 5)


# ---------------------------------------------------------------------------------------------------- part targets
def test_compose_part_target_exclusive_in_list_order():
    first = torch.zeros(4, 4)
    first[:, :2] = 1.0  # left half
    second = torch.ones(4, 4)
    second[0, 0] = 0.0  # everything but one pixel
    protos = part_prototypes(2)
    target = compose_part_target(torch.stack([first, second]), [0.1, 0.1], protos)
    assert target.shape == (3, 4, 4)
    assert torch.allclose(target[:, :, :2], protos[1][:, None, None].expand(3, 4, 2))  # red only, green removed
    assert torch.allclose(target[:, :, 2:], protos[2][:, None, None].expand(3, 4, 2))
    reversed_target = compose_part_target(torch.stack([second, first]), [0.1, 0.1], protos)
    assert torch.allclose(reversed_target[:, 1:, :], protos[1][:, None, None].expand(3, 3, 4))  # now part 1 wins
    assert torch.equal(reversed_target[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))  # only `first` covers (0, 0)


def test_compose_part_target_temperature_and_upsampling():
    ramp = torch.linspace(0.0, 1.0, 11).repeat(11, 1)  # a = column / 10
    protos = part_prototypes(1)
    out = {tau: compose_part_target(ramp[None], [tau], protos)[0] for tau in (0.1, 1.0)}
    for tau, target in out.items():
        expected = (torch.exp(ramp / tau) - 1) / (math.exp(1 / tau) - 1)
        assert torch.allclose(target, expected, atol=1e-5)
    assert int((out[0.1] > 0.5).sum()) == 11 < int((out[1.0] > 0.5).sum()) == 44
    assert torch.equal(out[0.1][:, 1], out[0.1][0, 1].expand(11))
    big = compose_part_target(torch.rand(3, 8, 8), [0.2, 0.2, 0.7], part_prototypes(3), size=(32, 24))
    assert big.shape == (3, 32, 24) and float(big.min()) == 0.0 and float(big.max()) == pytest.approx(1.0)
    identity_calls = []
    refine = lambda m, rgb: identity_calls.append(1) or m  # noqa: E731
    compose_part_target(torch.rand(2, 4, 4), [0.1, 0.1], part_prototypes(2), refine=refine)
    assert len(identity_calls) == 2


# ------------------------------------------------------------------------------------------ softness, neighbours
def test_softness_ranks_view_varying_labels_first():
    torch.manual_seed(0)
    viewmats = _ring(8)
    means = torch.randn(3, 3) * 0.1
    sh = init_label_sh(3, degree=2)
    sh[0, 0] = torch.tensor([1.77, -1.77, -1.77])  # constant red
    sh[1, 0] = torch.tensor([0.5, 0.2, -0.3])  # constant, ambiguous colour
    sh[2, 0] = torch.tensor([1.0, -1.0, -1.0])
    sh[2, 1:] = torch.randn(8, 3) * 0.8  # view-dependent label
    for clamp in (False, True):
        for mean_source in ("views", "dc"):
            s = softness(means, sh, viewmats, part_prototypes(3), 2, clamp_entropy=clamp, mean_source=mean_source)
            assert s.shape == (3,)
            assert s[2].item() == pytest.approx(1.0) and s[0].item() == pytest.approx(0.0) and s[1].item() == 0.0


def test_neighbour_loss_exact_value_zero_for_constant_and_dc_only_gradients():
    means = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0], [11.0, 0, 0]], requires_grad=True)
    dc = torch.tensor([[0.0, 0, 0], [0.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]])
    soft = torch.tensor([0.0, 0.1, 0.9, 1.0])
    # anchors 0 (lowest) and 3 (highest); k=1: neighbours 1 and 2 share their labels -> 0
    assert neighbour_loss(means, dc, soft, num_anchors=2, k=1).item() == 0.0
    # k=2: anchor 0 sees {1 (same), 2 (|1|)}, anchor 3 sees {2 (same), 1 (|1|)} -> mean 0.5
    assert neighbour_loss(means, dc, soft, num_anchors=2, k=2).item() == pytest.approx(0.5)

    torch.manual_seed(0)
    pts = torch.randn(400, 3, requires_grad=True)
    label_sh = torch.zeros(400, 4, 3)
    label_sh[:, 0] = torch.tensor([0.3, -0.2, 0.1])
    label_sh[:, 1:] = torch.randn(400, 3, 3)
    label_sh.requires_grad_(True)
    score = torch.rand(400, requires_grad=True)
    zero = neighbour_loss(pts, label_sh[:, 0], score, num_anchors=100, k=10)
    assert zero.item() == 0.0
    noisy = label_sh[:, 0] + torch.randn(400, 3)
    gen = torch.Generator().manual_seed(0)
    loss = neighbour_loss(pts, noisy, score, num_anchors=100, k=10, max_points=300, generator=gen)
    loss.backward()
    assert loss.item() > 0.5
    assert pts.grad is None and score.grad is None
    assert torch.equal(label_sh.grad[:, 1:], torch.zeros(400, 3, 3)) and float(label_sh.grad[:, 0].abs().sum()) > 0


def test_knn_chunked_matches_brute_force():
    torch.manual_seed(0)
    pts = torch.rand(300, 3)
    queries = torch.tensor([0, 5, 17, 299])
    got = knn_indices(pts, queries, k=7, query_chunk=3, point_chunk=50)
    dist = torch.cdist(pts[queries], pts)
    dist[torch.arange(4), queries] = float("inf")
    expected = torch.topk(dist, 7, largest=False).indices
    assert torch.equal(got.sort(dim=1).values, expected.sort(dim=1).values)


# ----------------------------------------------------------------------------------------------- sidecar targets
@pytest.fixture
def part_dataset(tmp_path):
    """3 views of 32x32 with part ids: object 1 (cap id 1 above stem id 2), object 2 (cap id 3)."""
    write_scene_meta(
        tmp_path,
        {
            "objects": [{"id": 1, "name": "red mushroom"}, {"id": 2, "name": "blue mushroom"}],
            "parts": [
                {"id": 1, "object_id": 1, "name": "cap"},
                {"id": 2, "object_id": 1, "name": "stem"},
                {"id": 3, "object_id": 2, "name": "cap"},
            ],
        },
    )
    stems = []
    for v in range(6):
        ids = np.zeros((32, 32), dtype=np.int64)
        ids[4 + v : 14 + v, 4:20] = 1
        ids[14 + v : 24, 8:16] = 2
        ids[5:12, 22:30] = 3
        write_parts(tmp_path, f"f{v}", ids)
        stems.append(f"f{v}")
    files = [f"images/{s}.png" for s in stems]
    meta = {"frames": [{"file_path": f} for f in files], "train_filenames": files[:4]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    return tmp_path


def _source(root, **kw):
    base = dict(dataset=root, seg_list=(("stem",), ("cap",)), split="all")
    return SidecarPartTargetsConfig(**{**base, **kw}).setup()


def test_sidecar_gt_labels_parts_objects_and_split(part_dataset):
    src = _source(part_dataset, noise=False)
    assert src.num_views == 6 and src.num_parts == 2
    gt = src.gt_labels(0)
    assert gt[15, 10].item() == 1 and gt[6, 6].item() == 2 and gt[8, 25].item() == 2 and gt[0, 0].item() == 0
    assert torch.equal(src.noisy_labels(3), src.gt_labels(3))
    assert torch.equal(src.targets(0), src.prototypes[gt].permute(2, 0, 1))
    one = _source(part_dataset, noise=False, object_name="red mushroom")
    assert one.gt_labels(0)[8, 25].item() == 0 and one.gt_labels(0)[6, 6].item() == 2
    assert _source(part_dataset, split="train").num_views == 4
    assert _source(part_dataset, noise=False, size=(16, 16)).gt_labels(0).shape == (16, 16)
    with pytest.raises(ValueError, match="matches no part"):
        _source(part_dataset, seg_list=(("nose",),))
    with pytest.raises(ValueError, match="no object named"):
        _source(part_dataset, object_name="duck")


def test_noise_boundary_is_deterministic_and_local(part_dataset):
    a, b = _source(part_dataset, flip_prob=0.0, seed=1), _source(part_dataset, flip_prob=0.0, seed=1)
    other = _source(part_dataset, flip_prob=0.0, seed=2)
    changed = 0
    for v in range(6):
        noisy, gt = a.noisy_labels(v), a.gt_labels(v)
        assert torch.equal(noisy, b.noisy_labels(v))
        assert torch.equal(noisy, a.noisy_labels(v))  # repeatable, whatever the call order
        diff = noisy != gt
        changed += int(diff.sum())
        edges = torch.zeros_like(diff)
        for label in gt.unique():
            region = gt == label
            edges |= dilate_mask(region, 2) & dilate_mask(~region, 2)
        assert not bool((diff & ~edges).any())  # changes stay within boundary_px = 2 of a GT boundary
    assert changed > 0
    assert any(not torch.equal(a.noisy_labels(v), other.noisy_labels(v)) for v in range(6))


def test_noise_flip_swaps_whole_regions(part_dataset):
    src = _source(part_dataset, boundary_px=0, flip_prob=1.0)
    for v in range(6):
        gt = src.gt_labels(v)
        swapped = torch.where(gt == 1, 2, torch.where(gt == 2, 1, gt))
        assert torch.equal(src.noisy_labels(v), swapped)
        assert torch.equal(src.targets(v), src.prototypes[swapped].permute(2, 0, 1))
    never = _source(part_dataset, boundary_px=0, flip_prob=0.0)
    assert all(torch.equal(never.noisy_labels(v), never.gt_labels(v)) for v in range(6))
