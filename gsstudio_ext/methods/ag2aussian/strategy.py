"""Anchor densification (spec §2.6): grow anchors where children's screen gradients are large, prune weak anchors.

Same interface as gsplat's strategies (``initialize_state``, ``step_pre_backward``, ``step_post_backward``), so the
splatfacto training callbacks drive it unchanged; it edits the anchor- and child-level rows of ``gauss_params``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch import Tensor

from gsstudio_ext.core.anchors import ANCHOR_KEYS, CHILD_KEYS, child_positions
from gsstudio_ext.core.param_surgery import append_rows, keep_rows
from gsstudio_ext.core.sh import SH2RGB
from gsstudio_ext.methods.ag2aussian.anchors import children_params, voxel_keys


@dataclass
class AnchorStrategy:
    """Scaffold-GS style anchor growth and pruning with AG2aussian's defaults (iterations are training steps)."""

    voxel_size: float
    scene_radius: float
    children: int = 5
    sh_degree: int = 3
    refine_start: int = 500
    refine_stop: int = 20000
    refine_every: int = 100
    reset_every: int = 3000
    grad_threshold: float = 1.5e-4
    min_observations: int = 10
    growth_levels: int = 3
    growth_cell_voxels: float = 16.0
    growth_std_scale: float = 3.0
    min_mean_opacity: float = 0.0099
    big_after: int = 3000
    big_fraction: float = 0.3
    big_scale: float = 0.1
    big_screen_radius: float = 40.0
    new_opacity: float = 0.01
    offset_std: float = 0.1
    key_for_gradient: str = "means2d"
    absgrad: bool = False

    def initialize_state(self, scene_scale: float = 1.0) -> Dict[str, Any]:
        return {"grad2d": None, "count": None, "max_radius": None}

    def step_pre_backward(self, params, optimizers, state, step, info) -> None:
        info[self.key_for_gradient].retain_grad()

    def step_post_backward(self, params, optimizers, state, step, info, packed: bool = False, lr=None) -> None:
        if step >= self.refine_stop:
            return
        self._accumulate(params, state, info)
        if step > self.refine_start and step % self.refine_every == 0:
            self._grow(params, optimizers, state)
            self._prune(params, optimizers, state, step)
            state["grad2d"] = state["count"] = state["max_radius"] = None
        if step > 0 and step % self.reset_every == 0:
            with torch.no_grad():
                cap = math.log(self.new_opacity / (1 - self.new_opacity))
                params["opacities"].data.clamp_(max=cap)
                opt = optimizers.get("opacities")
                if opt is not None:
                    for value in opt.state[params["opacities"]].values():
                        if isinstance(value, Tensor) and value.dim() > 0:
                            value.zero_()

    @torch.no_grad()
    def _accumulate(self, params, state, info) -> None:
        grads = info[self.key_for_gradient].grad.clone()  # [C, N, 2]
        grads[..., 0] *= info["width"] / 2.0 * info["n_cameras"]
        grads[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
        n = params["offsets"].shape[0]
        if state["grad2d"] is None:
            state["grad2d"] = torch.zeros(n, device=grads.device)
            state["count"] = torch.zeros(n, device=grads.device)
            state["max_radius"] = torch.zeros(n, device=grads.device)
        seen = info["radii"] > 0
        ids = torch.where(seen)[1]
        state["grad2d"].index_add_(0, ids, grads[seen].norm(dim=-1))
        state["count"].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        radii = info["radii"][seen].float()
        state["max_radius"][ids] = torch.maximum(state["max_radius"][ids], radii)

    @torch.no_grad()
    def _grow(self, params, optimizers, state) -> None:
        offsets, scales = params["offsets"], torch.exp(params["scales"])
        radius = params["anchor_radius"][params["point2anchor"]]
        signal = state["grad2d"] / state["count"].clamp_min(1)
        signal = signal + 1e-4 * offsets.norm(dim=-1) + 5e-5 * torch.relu(scales.amax(dim=-1) - radius)
        observed = state["count"] > self.min_observations
        positions = child_positions(params)
        new_rows = {key: [] for key in ANCHOR_KEYS + CHILD_KEYS}
        taken = set(map(tuple, voxel_keys(params["anchor_xyz"], self.voxel_size).tolist()))
        for level in range(self.growth_levels):
            cell = self.voxel_size * self.growth_cell_voxels / 4**level
            chosen = (signal > self.grad_threshold * 2**level) & observed
            chosen &= torch.rand_like(signal) < 1 - 0.5 ** (level + 1)
            if not chosen.any():
                continue
            samples = positions[chosen] + torch.randn_like(positions[chosen]) * self.growth_std_scale * scales[
                chosen
            ].amax(dim=-1, keepdim=True)
            keys, inverse = torch.unique(voxel_keys(samples, cell), dim=0, return_inverse=True)
            fine_keys = voxel_keys((keys.float() + 0.5) * cell, self.voxel_size).tolist()
            fresh = torch.tensor([tuple(k) not in taken for k in fine_keys], device=keys.device)
            if not fresh.any():
                continue
            taken.update(tuple(k) for k, f in zip(fine_keys, fresh.tolist()) if f)
            centers = (keys[fresh].float() + 0.5) * cell
            parent_dc = params["features_dc"][chosen]
            mean_dc = torch.zeros(keys.shape[0], 3, device=keys.device).index_add_(0, inverse, parent_dc)
            mean_dc = mean_dc / torch.bincount(inverse, minlength=keys.shape[0]).clamp_min(1)[:, None]
            nearest = torch.cdist(centers, params["anchor_xyz"]).argmin(dim=1)
            rgb = SH2RGB(mean_dc[fresh]) if self.sh_degree > 0 else torch.sigmoid(mean_dc[fresh])
            radius_new = torch.full((centers.shape[0],), cell, device=centers.device)
            child = children_params(
                centers.cpu(), radius_new.cpu(), rgb.clamp(0, 1).cpu(), self.children, self.sh_degree,
                0.8 * radius_new.cpu(), self.new_opacity, self.offset_std,
            )  # fmt: skip
            base = params["anchor_xyz"].shape[0] + sum(len(x) for x in new_rows["anchor_xyz"])
            child["point2anchor"] = child["point2anchor"] + base
            new_rows["anchor_xyz"].append(centers)
            new_rows["anchor_radius"].append(radius_new)
            new_rows["anchor_feat"].append(params["anchor_feat"][nearest])
            for key, value in child.items():
                new_rows[key].append(value.to(centers.device))
        if new_rows["anchor_xyz"]:
            append_rows(params, optimizers, {key: torch.cat(rows) for key, rows in new_rows.items()})

    @torch.no_grad()
    def _prune(self, params, optimizers, state, step) -> None:
        p2a = params["point2anchor"]
        A = params["anchor_xyz"].shape[0]
        n_old = state["max_radius"].shape[0]
        opacity = torch.sigmoid(params["opacities"][:, 0])
        count = torch.bincount(p2a, minlength=A).clamp_min(1).float()
        mean_opacity = torch.zeros(A, device=opacity.device).index_add_(0, p2a, opacity) / count
        bad = mean_opacity < self.min_mean_opacity
        nan_scale = torch.isnan(params["scales"]).any(dim=-1)
        bad |= torch.zeros(A, dtype=torch.bool, device=bad.device).index_fill_(0, p2a[nan_scale], True)
        if step > self.big_after:
            big = torch.exp(params["scales"]).amax(dim=-1) > self.big_scale * self.scene_radius
            screen = torch.zeros_like(big)
            screen[:n_old] = state["max_radius"] > self.big_screen_radius
            big_count = torch.zeros(A, device=bad.device).index_add_(0, p2a, (big | screen).float())
            bad |= big_count / count > self.big_fraction
        if not bad.any():
            return
        keep_anchor = ~bad
        keep_child = keep_anchor[p2a]
        remap = torch.cumsum(keep_anchor.long(), 0) - 1
        keep_rows(params, optimizers, CHILD_KEYS, keep_child)
        keep_rows(params, optimizers, ANCHOR_KEYS, keep_anchor)
        params["point2anchor"].data.copy_(remap[params["point2anchor"]])
