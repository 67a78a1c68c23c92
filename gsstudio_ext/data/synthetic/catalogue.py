"""Object recipes of the synthetic scenes: classes, named parts, the primitives that draw them, and colours.

Every recipe is built in its own object frame (metres, z up, resting on z = 0, centred on the z axis) from
boxes, spheres, cylinders and a few meshes shipped in ``pybullet_data`` (spheres are drawn with pybullet_data's
smooth unit-sphere mesh, cylinders with a generated prism mesh, so the drawn geometry is known exactly). One
primitive is a :class:`Piece`; several pieces may share a part (the four legs of a chair are the part "legs").
Each piece is painted either with the object's main colour (its colour word) or with a fixed accent colour, so
parts are visually distinct. The class list is the full catalogue, in a fixed order, so every scene shares it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

Vec3 = Tuple[float, float, float]
HALF_PI = math.pi / 2


@dataclass(frozen=True)
class Piece:
    """One rendered primitive of an object."""

    part: str
    """Name of the part this piece belongs to."""
    shape: str
    """"box" | "sphere" | "cylinder" (axis = local z) | "mesh"."""
    size: Vec3
    """box: half extents; sphere: (radius, 0, 0); cylinder: (radius, length, 0); mesh: scale per axis."""
    pos: Vec3
    """Centre of the piece in the object frame (metres, at object scale 1)."""
    rpy: Vec3 = (0.0, 0.0, 0.0)
    """Roll, pitch, yaw of the piece in the object frame (radians)."""
    mesh: str = ""
    """Mesh file relative to ``pybullet_data.getDataPath()`` (shape "mesh" only)."""
    paint: str = "main"
    """"main" (the object's colour word) or a key of :data:`ACCENTS`."""


@dataclass(frozen=True)
class Recipe:
    """How to build one object class."""

    cls: str
    """Class name (also the object's name when it is the only one of its class in a scene)."""
    parts: Tuple[str, ...]
    """Part names, in part-id order."""
    pieces: Tuple[Piece, ...]
    """Primitives that draw the object."""


COLOURS: Dict[str, Vec3] = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.18, 0.66, 0.24),
    "blue": (0.16, 0.32, 0.86),
    "yellow": (0.95, 0.82, 0.16),
    "orange": (0.96, 0.50, 0.10),
    "purple": (0.55, 0.24, 0.75),
    "pink": (0.95, 0.50, 0.72),
    "cyan": (0.16, 0.78, 0.82),
    "brown": (0.50, 0.31, 0.16),
}
"""Object colour words and their linear RGB in [0, 1]; a scene gives its objects distinct colours while it can."""

ACCENTS: Dict[str, Vec3] = {
    "dark": (0.18, 0.18, 0.20),
    "white": (0.93, 0.93, 0.90),
    "wood": (0.45, 0.30, 0.17),
}
"""Fixed colours of secondary parts (handles, hats, legs, wheels)."""

TABLE_COLOUR: Vec3 = (0.78, 0.76, 0.72)
"""Colour of the table top under the objects (background, class 0)."""

PATTERNS: Tuple[str, ...] = ("stripes", "checker", "dots", "noise", "waves")
"""Procedural texture patterns an object's main colour may carry."""

DUCK_MESH = "duck.obj"
TORUS_MESH = "torus/torus_textured.obj"
SPHERE_MESH = "sphere_smooth.obj"
CYLINDER_SEGMENTS = 48
"""Sides of the cylinder mesh the renderer draws (pybullet's GEOM_CYLINDER adds a 1 mm margin, so it is not used)."""


def _cyl(part: str, r: float, length: float, pos: Vec3, paint: str = "main", rpy: Vec3 = (0.0, 0.0, 0.0)) -> Piece:
    return Piece(part, "cylinder", (r, length, 0.0), pos, rpy, paint=paint)


def _box(part: str, half: Vec3, pos: Vec3, paint: str = "main") -> Piece:
    return Piece(part, "box", half, pos, paint=paint)


def _sphere(part: str, r: float, pos: Vec3, paint: str = "main") -> Piece:
    return Piece(part, "sphere", (r, 0.0, 0.0), pos, paint=paint)


def _mesh(part: str, mesh: str, scale: Vec3, pos: Vec3, rpy: Vec3 = (0.0, 0.0, 0.0), paint: str = "main") -> Piece:
    return Piece(part, "mesh", scale, pos, rpy, mesh=mesh, paint=paint)


def _legs(half: float, offset: float, height: float) -> Tuple[Piece, ...]:
    return tuple(
        _box("legs", (half, half, height / 2), (sx * offset, sy * offset, height / 2), paint="dark")
        for sx in (-1, 1)
        for sy in (-1, 1)
    )


def _wheels(r: float, width: float, dx: float, dy: float) -> Tuple[Piece, ...]:
    return tuple(
        _cyl("wheels", r, width, (sx * dx, sy * dy, r), paint="dark", rpy=(HALF_PI, 0.0, 0.0))
        for sx in (-1, 1)
        for sy in (-1, 1)
    )


# The duck mesh is y-up; rolled +90 degrees about x it stands on z. Offsets centre it and put it on z = 0.
_DUCK_SCALE = 0.05
RECIPES: Tuple[Recipe, ...] = (
    Recipe(
        "mug",
        ("body", "handle"),
        (
            _cyl("body", 0.034, 0.085, (0.0, 0.0, 0.0425)),
            _mesh("handle", TORUS_MESH, (0.03, 0.04, 0.03), (0.050, 0.0, 0.044), paint="white"),
        ),
    ),
    Recipe(
        "snowman",
        ("base", "head", "hat"),
        (
            _sphere("base", 0.040, (0.0, 0.0, 0.040)),
            _sphere("head", 0.028, (0.0, 0.0, 0.102)),
            _cyl("hat", 0.019, 0.032, (0.0, 0.0, 0.140), paint="dark"),
        ),
    ),
    Recipe(
        "duck",
        ("body", "hat"),
        (
            _mesh("body", DUCK_MESH, (_DUCK_SCALE,) * 3, (0.0067, 0.0019, -0.005), rpy=(HALF_PI, 0.0, 0.0)),
            _cyl("hat", 0.013, 0.018, (-0.011, 0.0, 0.084), paint="dark"),
        ),
    ),
    Recipe(
        "lamp",
        ("base", "pole", "shade"),
        (
            _cyl("base", 0.040, 0.012, (0.0, 0.0, 0.006), paint="dark"),
            _cyl("pole", 0.006, 0.092, (0.0, 0.0, 0.058), paint="dark"),
            _cyl("shade", 0.036, 0.048, (0.0, 0.0, 0.120)),
        ),
    ),
    Recipe(
        "mushroom",
        ("stem", "cap"),
        (
            _cyl("stem", 0.015, 0.060, (0.0, 0.0, 0.030), paint="white"),
            _mesh("cap", SPHERE_MESH, (0.040, 0.040, 0.025), (0.0, 0.0, 0.062)),
        ),
    ),
    Recipe(
        "chair",
        ("seat", "legs", "back"),
        (
            _box("seat", (0.042, 0.042, 0.006), (0.0, 0.0, 0.050)),
            *_legs(0.005, 0.035, 0.044),
            _box("back", (0.042, 0.006, 0.042), (0.0, 0.036, 0.098)),
        ),
    ),
    Recipe(
        "teddy",
        ("body", "head", "ears"),
        (
            _sphere("body", 0.038, (0.0, 0.0, 0.038)),
            _sphere("head", 0.027, (0.0, 0.0, 0.098)),
            _sphere("ears", 0.011, (-0.021, 0.0, 0.119), paint="dark"),
            _sphere("ears", 0.011, (0.021, 0.0, 0.119), paint="dark"),
        ),
    ),
    Recipe(
        "car",
        ("body", "cabin", "wheels"),
        (
            _box("body", (0.060, 0.030, 0.015), (0.0, 0.0, 0.031)),
            _box("cabin", (0.030, 0.026, 0.015), (-0.010, 0.0, 0.061), paint="white"),
            *_wheels(0.016, 0.010, 0.036, 0.032),
        ),
    ),
    Recipe(
        "box",
        ("body", "lid"),
        (
            _box("body", (0.034, 0.034, 0.030), (0.0, 0.0, 0.030)),
            _box("lid", (0.038, 0.038, 0.009), (0.0, 0.0, 0.068), paint="white"),
        ),
    ),
    Recipe(
        "plant",
        ("pot", "trunk", "leaves"),
        (
            _cyl("pot", 0.030, 0.045, (0.0, 0.0, 0.0225), paint="white"),
            _cyl("trunk", 0.005, 0.040, (0.0, 0.0, 0.062), paint="wood"),
            _mesh("leaves", SPHERE_MESH, (0.042, 0.042, 0.036), (0.0, 0.0, 0.110)),
        ),
    ),
)
"""Every object class, in class-id order (class id = position + 1; 0 is background)."""

CLASSES: Tuple[str, ...] = tuple(r.cls for r in RECIPES)


def class_list() -> List[str]:
    """The class list every synthetic scene writes: ``["background", *CLASSES]``."""
    return ["background", *CLASSES]


def recipe(cls: str) -> Recipe:
    """The recipe of class ``cls``."""
    for r in RECIPES:
        if r.cls == cls:
            return r
    raise KeyError(f"unknown object class '{cls}'; the catalogue has {list(CLASSES)}")


def data_path() -> Path:
    """Folder of the meshes shipped with pybullet (``pybullet_data``)."""
    try:
        import pybullet_data
    except ImportError as err:  # pragma: no cover - pybullet is a declared dependency of the generator
        raise ImportError("the synthetic generator needs pybullet: pip install 'gsstudio_ext[synthetic]'") from err
    return Path(pybullet_data.getDataPath())


@lru_cache(maxsize=None)
def _mesh_vertices(mesh: str) -> np.ndarray:
    path = data_path() / mesh
    rows = [line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")]
    return np.asarray(rows, dtype=np.float64)


def rpy_matrix(rpy: Vec3) -> np.ndarray:
    """Rotation matrix [3, 3] of roll-pitch-yaw angles (pybullet's convention: R = Rz(yaw) Ry(pitch) Rx(roll))."""
    r, p, y = rpy
    cr, sr, cp, sp, cy, sy = math.cos(r), math.sin(r), math.cos(p), math.sin(p), math.cos(y), math.sin(y)
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def piece_local_points(piece: Piece) -> np.ndarray:
    """Vertices [N, 3] of the rendered ``piece`` in its own frame (before ``pos`` / ``rpy``).

    The rendered surface lies in their convex hull, so their bounds are the exact bounds of what is drawn.
    """
    if piece.shape == "box":
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        return signs * np.asarray(piece.size)
    if piece.shape == "sphere":  # rendered as the unit UV-sphere mesh scaled by the radius
        return _mesh_vertices(SPHERE_MESH) * piece.size[0]
    if piece.shape == "cylinder":  # rendered as a CYLINDER_SEGMENTS-sided prism (render.cylinder_obj)
        radius, length = piece.size[0], piece.size[1]
        angle = 2 * math.pi * np.arange(CYLINDER_SEGMENTS) / CYLINDER_SEGMENTS
        ring = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        top = np.concatenate([ring, np.full((len(ring), 1), length / 2)], axis=1)
        bottom = np.concatenate([ring, np.full((len(ring), 1), -length / 2)], axis=1)
        return np.concatenate([top, bottom])
    if piece.shape == "mesh":
        return _mesh_vertices(piece.mesh) * np.asarray(piece.size)
    raise ValueError(f"unknown piece shape '{piece.shape}'")


def piece_top_local(piece: Piece) -> np.ndarray:
    """A point [3] on the piece's rendered top surface, in its own frame: box/cylinder top-face centre, else the
    highest vertex after the piece's rotation."""
    if piece.shape == "box":
        return np.array([0.0, 0.0, piece.size[2]])
    if piece.shape == "cylinder":
        return np.array([0.0, 0.0, piece.size[1] / 2])
    pts = piece_local_points(piece)
    return pts[int(np.argmax((pts @ rpy_matrix(piece.rpy).T)[:, 2]))]


def piece_points(piece: Piece) -> np.ndarray:
    """Surface points [N, 3] of ``piece`` in the object frame (at object scale 1)."""
    return piece_local_points(piece) @ rpy_matrix(piece.rpy).T + np.asarray(piece.pos)


def piece_top(piece: Piece) -> np.ndarray:
    """Top surface point [3] of ``piece`` in the object frame (at object scale 1)."""
    return rpy_matrix(piece.rpy) @ piece_top_local(piece) + np.asarray(piece.pos)


def footprint_radius(rec: Recipe) -> float:
    """Radius of the smallest z-axis-centred disc holding the object's footprint (at scale 1)."""
    pts = np.concatenate([piece_points(p) for p in rec.pieces])
    return float(np.max(np.linalg.norm(pts[:, :2], axis=1)))
