"""Anchor growth and pruning keep anchors, children and optimizer state consistent."""

import torch
from torch.nn import Parameter

from gsstudio_ext.core.anchors import ANCHOR_KEYS, CHILD_KEYS
from gsstudio_ext.methods.ag2aussian.anchors import init_anchor_params, voxel_keys
from gsstudio_ext.methods.ag2aussian.strategy import AnchorStrategy

VOXEL = 0.1


def _setup(num_points=40):
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(num_points, 3, generator=gen) * 2.0
    raw = init_anchor_params(points, None, VOXEL, 3, 4, 1, 0.1, 0.1, gen)
    params = {
        k: Parameter(v, requires_grad=v.is_floating_point() and k not in ("anchor_xyz", "anchor_radius"))
        for k, v in raw.items()
    }
    optimizers = {k: torch.optim.Adam([p], lr=0.01) for k, p in params.items() if p.requires_grad}
    strategy = AnchorStrategy(voxel_size=VOXEL, scene_radius=2.0, children=3, sh_degree=1, refine_start=0,
                              refine_every=1, min_observations=0)  # fmt: skip
    return params, optimizers, strategy


def _info(n, grad_scale):
    means2d = torch.zeros(1, n, 2, requires_grad=True)
    (means2d * grad_scale).sum().backward()
    return {"means2d": means2d, "width": 64, "height": 64, "n_cameras": 1, "radii": torch.full((1, n), 3)}


def _consistent(params):
    A = params["anchor_xyz"].shape[0]
    N = params["offsets"].shape[0]
    assert all(params[k].shape[0] == A for k in ANCHOR_KEYS)
    assert all(params[k].shape[0] == N for k in CHILD_KEYS)
    assert params["point2anchor"].min() >= 0 and params["point2anchor"].max() < A
    assert torch.bincount(params["point2anchor"], minlength=A).min() >= 1  # every anchor has children


def test_prune_removes_anchors_whose_children_are_transparent():
    params, optimizers, strategy = _setup()
    A = params["anchor_xyz"].shape[0]
    dead = torch.zeros(A, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        params["opacities"].data[dead[params["point2anchor"]]] = -12.0
    kept_xyz = params["anchor_xyz"].data[~dead].clone()
    state = strategy.initialize_state()
    strategy._accumulate(params, state, _info(params["offsets"].shape[0], 0.0))
    strategy._prune(params, optimizers, state, step=10)
    _consistent(params)
    assert torch.equal(params["anchor_xyz"].data, kept_xyz)
    assert optimizers["anchor_feat"].param_groups[0]["params"][0] is params["anchor_feat"]


def test_growth_adds_whole_anchors_in_free_cells():
    params, optimizers, strategy = _setup()
    A, N = params["anchor_xyz"].shape[0], params["offsets"].shape[0]
    state = strategy.initialize_state()
    torch.manual_seed(0)
    strategy._accumulate(params, state, _info(N, 1.0))  # large gradients everywhere
    strategy._grow(params, optimizers, state)
    _consistent(params)
    new = params["anchor_xyz"].shape[0] - A
    assert new > 0 and params["offsets"].shape[0] == N + 3 * new
    cells = voxel_keys(params["anchor_xyz"].data, VOXEL)
    assert torch.unique(cells, dim=0).shape[0] == cells.shape[0]  # at most one anchor per fine voxel
    # new anchors copy the feature of an existing anchor and start with transparent children
    old_features = params["anchor_feat"].data[:A]
    for feature in params["anchor_feat"].data[A:]:
        assert (old_features - feature).abs().sum(dim=-1).min() == 0
    assert torch.allclose(torch.sigmoid(params["opacities"].data[N:]), torch.tensor(strategy.new_opacity))


def test_small_gradients_grow_nothing():
    params, optimizers, strategy = _setup()
    A = params["anchor_xyz"].shape[0]
    state = strategy.initialize_state()
    strategy._accumulate(params, state, _info(params["offsets"].shape[0], 0.0))
    strategy._grow(params, optimizers, state)
    assert params["anchor_xyz"].shape[0] == A
