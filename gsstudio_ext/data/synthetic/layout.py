"""Seeded scene plan: which objects, their classes, names, colours, sizes, parts and non-overlapping placement.

World frame: metres, z up, the table top is the plane z = 0 and objects stand on it. Object ids start at 1 in the
order they are drawn; part ids are global and start at 1 (object 1's parts first, in recipe order).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np

from gsstudio_ext.data.synthetic import catalogue
from gsstudio_ext.data.synthetic.catalogue import COLOURS, PATTERNS, Piece, Recipe
from gsstudio_ext.data.synthetic.config import SynthConfig

LARGE_RATIO = 1.6
"""An object whose bbox volume is >= this times the scene's median is "large"."""
SMALL_RATIO = 0.6
"""An object whose bbox volume is <= this times the scene's median is "small"; in between is "medium"."""


@dataclass
class PlacedPiece:
    """A piece of an object, posed in the world."""

    object_id: int
    """Object this piece belongs to."""
    part_id: int
    """Global part id (>= 1)."""
    piece: Piece
    """The recipe piece (object-frame geometry at scale 1)."""
    scale: float
    """Object scale factor applied to size and position."""
    position: np.ndarray
    """World position [3] of the piece centre."""
    rotation: np.ndarray
    """World rotation [3, 3] of the piece."""
    colour: Tuple[float, float, float]
    """Base RGB in [0, 1] of the piece's texture."""
    pattern: str
    """Texture pattern of the piece."""


@dataclass
class SceneObject:
    """One object of the scene with its exact ground truth."""

    id: int
    cls: str
    class_id: int
    name: str
    colour: str
    pattern: str
    scale: float
    xy: Tuple[float, float]
    yaw: float
    parts: List[Tuple[int, str]]
    """(global part id, part name) in recipe order."""
    accents: Dict[str, str] = field(default_factory=dict)
    """part name -> accent colour name, for parts not painted in the main colour."""
    bbox_min: np.ndarray = field(default_factory=lambda: np.zeros(3))
    bbox_max: np.ndarray = field(default_factory=lambda: np.zeros(3))
    surface_point: np.ndarray = field(default_factory=lambda: np.zeros(3))
    """A point on the object's top surface (the highest piece top), world [3]."""
    size: str = "medium"

    @property
    def center(self) -> np.ndarray:
        return (self.bbox_min + self.bbox_max) / 2

    @property
    def volume(self) -> float:
        return float(np.prod(self.bbox_max - self.bbox_min))

    def to_meta(self) -> Dict[str, Any]:
        """The object's entry in ``scene.json``."""

        def r(v: np.ndarray) -> List[float]:
            return [round(float(x), 6) for x in v]

        return {
            "id": self.id,
            "name": self.name,
            "class": self.cls,
            "class_id": self.class_id,
            "color": self.colour,
            "size": self.size,
            "parts": [pid for pid, _ in self.parts],
            "center": r(self.center),
            "bbox_min": r(self.bbox_min),
            "bbox_max": r(self.bbox_max),
            "surface_point": r(self.surface_point),
            "yaw": round(self.yaw, 6),
            "scale": round(self.scale, 6),
            "texture": self.pattern,
        }


@dataclass
class SceneLayout:
    """The planned scene: objects, their posed pieces, and the look-at point."""

    objects: List[SceneObject]
    pieces: List[PlacedPiece]
    center: np.ndarray
    """Look-at point [3]: centre of the union of the object bboxes."""
    extent: float
    """Radius of a sphere around ``center`` holding every object bbox."""

    def part_names(self) -> Dict[int, Tuple[int, str]]:
        """part id -> (object id, part name)."""
        return {pid: (obj.id, name) for obj in self.objects for pid, name in obj.parts}


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _draw_classes(rng: np.random.Generator, config: SynthConfig) -> List[str]:
    """Classes of the objects: ``min_repeated_classes`` classes twice (as far as possible), the rest at random."""
    classes = list(catalogue.CLASSES)
    repeated = min(config.min_repeated_classes, config.num_objects // 2) if config.max_per_class >= 2 else 0
    first = [classes[i] for i in rng.permutation(len(classes))[:repeated]]
    left = Counter({cls: config.max_per_class for cls in classes})
    left.subtract(Counter(first * 2))
    pool = [cls for cls in classes for _ in range(left[cls])]
    rest = [pool[i] for i in rng.permutation(len(pool))[: config.num_objects - 2 * len(first)]]
    drawn = first * 2 + rest
    return [drawn[i] for i in rng.permutation(len(drawn))]


def _draw_colours(rng: np.random.Generator, classes: List[str]) -> List[str]:
    """Colour words: distinct while the palette lasts, never repeated within a class (names stay unique)."""
    order = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    used: Counter = Counter()
    colours: List[str] = []
    for i, cls in enumerate(classes):
        taken = {c for c, k in zip(colours, classes) if k == cls}
        choice = min((c for c in order if c not in taken), key=lambda c: (used[c], order.index(c)))
        used[choice] += 1
        colours.append(choice)
    return colours


def _place(rng: np.random.Generator, radii: List[float], config: SynthConfig) -> List[Tuple[float, float]]:
    """Centres inside a disc with footprints at least ``min_gap`` apart; biggest first, disc grows on failure."""
    order = sorted(range(len(radii)), key=lambda i: -radii[i])
    disc = config.place_radius
    for _ in range(60):
        centres: Dict[int, Tuple[float, float]] = {}
        for i in order:
            for _try in range(400):
                rho = disc * math.sqrt(float(rng.uniform()))
                theta = float(rng.uniform(0, 2 * math.pi))
                xy = (rho * math.cos(theta), rho * math.sin(theta))
                if all(math.dist(xy, c) >= radii[i] + radii[j] + config.min_gap for j, c in centres.items()):
                    centres[i] = xy
                    break
            else:
                break
        if len(centres) == len(radii):
            return [centres[i] for i in range(len(radii))]
        disc *= 1.1
    raise RuntimeError(f"could not place {len(radii)} objects without overlap; raise place_radius")


def _size_words(volumes: List[float]) -> List[str]:
    median = float(np.median(volumes))
    return [
        "large" if v >= LARGE_RATIO * median else "small" if v <= SMALL_RATIO * median else "medium" for v in volumes
    ]


def _pose_pieces(obj: SceneObject, rec: Recipe, part_ids: Dict[str, int]) -> List[PlacedPiece]:
    yaw = _yaw_matrix(obj.yaw)
    base = np.array([obj.xy[0], obj.xy[1], 0.0])
    placed = []
    for piece in rec.pieces:
        colour = COLOURS[obj.colour] if piece.paint == "main" else catalogue.ACCENTS[piece.paint]
        pattern = obj.pattern if piece.paint == "main" else "noise"
        placed.append(
            PlacedPiece(
                object_id=obj.id,
                part_id=part_ids[piece.part],
                piece=piece,
                scale=obj.scale,
                position=yaw @ (obj.scale * np.asarray(piece.pos)) + base,
                rotation=yaw @ catalogue.rpy_matrix(piece.rpy),
                colour=colour,
                pattern=pattern,
            )
        )
    return placed


def plan_scene(config: SynthConfig) -> SceneLayout:
    """Draw a scene from ``config.seed``: classes, colours, scales, yaws, placement and the derived ground truth."""
    config.check()
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    classes = _draw_classes(rng, config)
    colours = _draw_colours(rng, classes)
    scales = [float(rng.uniform(config.scale_min, config.scale_max)) for _ in classes]
    yaws = [float(rng.uniform(0, 2 * math.pi)) for _ in classes]
    patterns = [PATTERNS[int(rng.integers(len(PATTERNS)))] for _ in classes]
    recipes = [catalogue.recipe(cls) for cls in classes]
    radii = [catalogue.footprint_radius(rec) * s for rec, s in zip(recipes, scales)]
    centres = _place(rng, radii, config)

    counts = Counter(classes)
    class_ids = {cls: i + 1 for i, cls in enumerate(catalogue.CLASSES)}
    objects: List[SceneObject] = []
    pieces: List[PlacedPiece] = []
    next_part = 1
    for i, (cls, rec) in enumerate(zip(classes, recipes)):
        name = cls if counts[cls] == 1 else f"{colours[i]} {cls}"
        part_ids = {part: next_part + k for k, part in enumerate(rec.parts)}
        next_part += len(rec.parts)
        accents = {p.part: p.paint for p in rec.pieces if p.paint != "main"}
        obj = SceneObject(
            id=i + 1,
            cls=cls,
            class_id=class_ids[cls],
            name=name,
            colour=colours[i],
            pattern=patterns[i],
            scale=scales[i],
            xy=centres[i],
            yaw=yaws[i],
            parts=[(part_ids[p], p) for p in rec.parts],
            accents=accents,
        )
        placed = _pose_pieces(obj, rec, part_ids)
        pts = np.concatenate(
            [(catalogue.piece_local_points(pp.piece) * pp.scale) @ pp.rotation.T + pp.position for pp in placed]
        )
        obj.bbox_min, obj.bbox_max = pts.min(axis=0), pts.max(axis=0)
        tops = [pp.rotation @ (catalogue.piece_top_local(pp.piece) * pp.scale) + pp.position for pp in placed]
        obj.surface_point = max(tops, key=lambda t: float(t[2]))
        objects.append(obj)
        pieces.extend(placed)

    for obj, word in zip(objects, _size_words([o.volume for o in objects])):
        obj.size = word
    lo = np.min([o.bbox_min for o in objects], axis=0)
    hi = np.max([o.bbox_max for o in objects], axis=0)
    center = (lo + hi) / 2
    corners = np.array(
        [
            [x, y, z]
            for o in objects
            for x in (o.bbox_min[0], o.bbox_max[0])
            for y in (o.bbox_min[1], o.bbox_max[1])
            for z in (o.bbox_min[2], o.bbox_max[2])
        ]
    )
    extent = float(np.max(np.linalg.norm(corners - center, axis=1)))
    return SceneLayout(objects=objects, pieces=pieces, center=center, extent=extent)
