"""Which training cameras RL3DEdit edits (spec §3.2 Views): N (= 9) views "evenly sampled around the scene".

- 360-degree captures: cameras sorted by azimuth about the scene centre; N taken at equal angular spacing.
- Forward-facing captures: farthest-point sampling on the camera centres.
- Auto-detection [I]: a capture is 360-degree when the viewing directions, projected on the plane orthogonal to the
  mean camera up vector, cover more than ``AZIMUTH_COVERAGE_360`` degrees (360 minus the largest empty gap).
  Directions rather than positions, because camera centres of a forward-facing rig can surround a point on their
  own plane while every camera still looks the same way.
- Consecutive entries are spatial neighbours (the pose reward and Ph-Loss use consecutive pairs): ring order for
  360-degree captures, a short open path for forward-facing ones.
- Fewer than N cameras: each is repeated (adjacent copies) up to N [P S4.2].

Cameras are OpenCV world-to-camera viewmats [V, 4, 4] (``core.cameras.viewmat_from_c2w`` converts nerfstudio's).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import torch
from torch import Tensor

from gsstudio_ext.core.sh import camera_centers

CaptureKind = Literal["auto", "360", "forward"]

NUM_VIEWS = 9
"""M = 9 views, one 3x3 grid [P]."""
AZIMUTH_COVERAGE_360 = 180.0
"""Viewing-direction azimuth coverage (degrees) above which a capture counts as 360-degree [I]."""


def up_direction(viewmats: Tensor) -> Tensor:
    """Float[3]: unit mean camera up vector in world space (OpenCV cameras: up = -y, the second row of R)."""
    up = -viewmats[:, 1, :3].mean(dim=0)
    return up / up.norm().clamp_min(1e-9)


def look_at_centre(viewmats: Tensor, damping: float = 1e-6) -> Tensor:
    """Float[3]: the point nearest (least squares) to every camera's optical axis, i.e. where the cameras look.

    A ``damping`` x V pull towards the mean camera centre keeps the solve defined for parallel axes."""
    centres = camera_centers(viewmats).double()
    dirs = viewmats[:, 2, :3].double()  # OpenCV +z = viewing direction, the third row of R
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    eye = torch.eye(3, dtype=torch.float64, device=viewmats.device)
    proj = eye - dirs[:, :, None] * dirs[:, None, :]  # [V, 3, 3] projectors orthogonal to each axis
    lam = damping * viewmats.shape[0]
    a = proj.sum(dim=0) + lam * eye
    b = (proj @ centres[:, :, None])[..., 0].sum(dim=0) + lam * centres.mean(dim=0)
    return torch.linalg.solve(a, b).to(viewmats.dtype)


def _plane_angles(vectors: Tensor, up: Tensor) -> Tensor:
    """Degrees in [0, 360) of vectors [V, 3] in the plane orthogonal to ``up`` (a fixed basis of that plane)."""
    seed = torch.zeros_like(up)
    seed[int(torch.argmin(up.abs()))] = 1.0  # the world axis least aligned with up
    e1 = seed - (seed @ up) * up
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(up, e1)
    return torch.rad2deg(torch.atan2(vectors @ e2, vectors @ e1)) % 360.0


def camera_azimuths(viewmats: Tensor, centre: Optional[Tensor] = None) -> Tensor:
    """Float[V]: azimuth (degrees, [0, 360), counter-clockwise about the mean up vector) of every camera centre
    around ``centre`` (default :func:`look_at_centre`)."""
    centre = look_at_centre(viewmats) if centre is None else centre.to(viewmats)
    return _plane_angles(camera_centers(viewmats) - centre, up_direction(viewmats))


def azimuth_coverage(azimuths: Tensor) -> float:
    """Degrees of the circle covered by a set of azimuths: 360 minus the largest gap between neighbours."""
    if azimuths.numel() < 2:
        return 0.0
    a = torch.sort(azimuths % 360.0).values
    gaps = torch.cat([a[1:] - a[:-1], (a[:1] + 360.0) - a[-1:]])
    return float(360.0 - gaps.max())


def capture_kind(viewmats: Tensor) -> Literal["360", "forward"]:
    """ "360" when the viewing directions' azimuths cover more than :data:`AZIMUTH_COVERAGE_360` degrees."""
    angles = _plane_angles(viewmats[:, 2, :3], up_direction(viewmats))
    return "360" if azimuth_coverage(angles) > AZIMUTH_COVERAGE_360 else "forward"


def _circular_distance(a: Tensor, b: Tensor) -> Tensor:
    d = (a - b).abs() % 360.0
    return torch.minimum(d, 360.0 - d)


def _ring_views(azimuths: Tensor, num: int) -> Tensor:
    """Long[num] cameras nearest to ``num`` equally spaced azimuths, in ring order.

    The ring's phase is the camera azimuth that minimises the summed angular error (ties: lowest camera index);
    targets then take the nearest camera not taken yet."""
    steps = torch.arange(num, dtype=azimuths.dtype, device=azimuths.device) * (360.0 / num)
    targets = azimuths[:, None, None] + steps[None, :, None]  # [phase V, num, 1]
    errors = _circular_distance(targets, azimuths[None, None, :]).min(dim=-1).values.sum(dim=-1)  # [V]
    phase = float(azimuths[int(torch.argmin(errors))])
    taken: list = []
    for target in (phase + steps).tolist():
        dist = _circular_distance(azimuths, torch.tensor(target, dtype=azimuths.dtype))
        if taken:
            dist[torch.tensor(taken)] = math.inf
        taken.append(int(torch.argmin(dist)))
    chosen = torch.tensor(taken, dtype=torch.long)
    return chosen[torch.argsort((azimuths[chosen] - phase) % 360.0, stable=True)]


def farthest_point_sampling(points: Tensor, num: int) -> Tensor:
    """Long[num]: indices of ``num`` points [V, 3] (num <= V), starting at the point nearest their mean, each next
    one the farthest from those chosen so far."""
    first = int(torch.argmin((points - points.mean(dim=0)).norm(dim=-1)))
    chosen = [first]
    dist = (points - points[first]).norm(dim=-1)
    for _ in range(num - 1):
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, (points - points[nxt]).norm(dim=-1))
    return torch.tensor(chosen, dtype=torch.long)


def neighbour_path(points: Tensor) -> Tensor:
    """Long[V]: an order of points [V, 3] in which consecutive entries are close: a nearest-neighbour open path from
    the point farthest from the mean, shortened by 2-opt segment reversals until none helps."""
    n = points.shape[0]
    dist = torch.cdist(points.double(), points.double())
    start = int(torch.argmax((points - points.mean(dim=0)).norm(dim=-1)))
    order = [start]
    free = set(range(n)) - {start}
    while free:
        last = order[-1]
        nxt = min(free, key=lambda j: (float(dist[last, j]), j))
        order.append(nxt)
        free.remove(nxt)
    improved = True
    while improved:
        improved = False
        for i in range(1, n - 1):
            for j in range(i + 1, n):
                # reversing order[i..j] swaps edges (i-1, i), (j, j+1) for (i-1, j), (i, j+1)
                before = dist[order[i - 1], order[i]] + (dist[order[j], order[j + 1]] if j + 1 < n else 0.0)
                after = dist[order[i - 1], order[j]] + (dist[order[i], order[j + 1]] if j + 1 < n else 0.0)
                if float(after) < float(before) - 1e-12:
                    order[i : j + 1] = order[i : j + 1][::-1]
                    improved = True
    return torch.tensor(order, dtype=torch.long)


def _repeat_up_to(order: Tensor, num: int) -> Tensor:
    """Repeat each of V ordered indices (adjacent copies, earlier ones first) to ``num`` entries in all."""
    v = order.shape[0]
    counts = torch.full((v,), num // v, dtype=torch.long)
    counts[: num % v] += 1
    return torch.repeat_interleave(order, counts)


def select_views(
    viewmats: Tensor,
    num: int = NUM_VIEWS,
    kind: CaptureKind = "auto",
    centre: Optional[Tensor] = None,
) -> Tensor:
    """Long[num]: indices into viewmats [V, 4, 4] (OpenCV world-to-camera) of the views to edit, ordered so that
    consecutive entries are spatial neighbours.

    Args:
        num: number of views N (9 for the 3x3 grid).
        kind: "360" (equal azimuth spacing about ``centre``), "forward" (farthest-point sampling on camera centres),
            or "auto" (:func:`capture_kind`).
        centre: Float[3] scene centre for the azimuths (default :func:`look_at_centre`); e.g. the Gaussians' mean.

    With V < num cameras every camera is used, in neighbour order, with adjacent repeats up to ``num``.
    """
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4) or viewmats.shape[0] < 1:
        raise ValueError(f"viewmats must be [V >= 1, 4, 4], got {list(viewmats.shape)}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if kind not in ("auto", "360", "forward"):
        raise ValueError(f"kind must be 'auto', '360' or 'forward', got {kind!r}")
    viewmats = viewmats.detach().cpu().float()
    v = viewmats.shape[0]
    kind = capture_kind(viewmats) if kind == "auto" else kind
    if v == 1:
        return torch.zeros(num, dtype=torch.long)
    if kind == "360":
        azimuths = camera_azimuths(viewmats, None if centre is None else centre.detach().cpu().float())
        if v <= num:
            return _repeat_up_to(torch.argsort(azimuths, stable=True), num)
        return _ring_views(azimuths, num)
    centres = camera_centers(viewmats)
    chosen = torch.arange(v) if v <= num else farthest_point_sampling(centres, num)
    ordered = chosen[neighbour_path(centres[chosen])]
    return _repeat_up_to(ordered, num)


def scale_intrinsics(Ks: Tensor, size: Tuple[int, int], new_size: Tuple[int, int]) -> Tensor:
    """Ks [..., 3, 3] of images of ``size`` (width, height) -> the same cameras at ``new_size`` (width, height):
    the x row (fx, skew, cx) times new_w / w and the y row (fy, cy) times new_h / h. Pixel centres stay at +0.5
    because a resize maps the image's edges to the edges."""
    (w, h), (new_w, new_h) = size, new_size
    if min(w, h, new_w, new_h) <= 0:
        raise ValueError(f"image sizes must be positive, got {size} -> {new_size}")
    out = Ks.clone()
    out[..., 0, :] = Ks[..., 0, :] * (new_w / w)
    out[..., 1, :] = Ks[..., 1, :] * (new_h / h)
    return out
