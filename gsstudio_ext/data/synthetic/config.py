"""Parameters of a synthetic scene (one dataclass; the CLI exposes every field as a flag)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass
class SynthConfig:
    """Everything that determines a synthetic scene; same config (seed included) -> byte-identical files."""

    seed: int = 0
    """Random seed: layout, classes, colours, textures and expression sampling all derive from it."""
    num_objects: int = 6
    """Objects on the table (>= 1)."""
    width: int = 96
    """Image width in pixels."""
    height: int = 96
    """Image height in pixels."""
    num_views: int = 40
    """Cameras on the orbit (train + eval)."""
    eval_every: int = 5
    """Every eval_every-th orbit view (eval_every-1, 2*eval_every-1, ...) is an eval view; 0 = no split lists."""
    fov_deg: float = 50.0
    """Horizontal field of view in degrees (square pixels: fl_x = fl_y)."""
    radius: Optional[float] = None
    """Camera distance to the look-at point in metres; None fits every object in every view."""
    elevation_min_deg: float = 25.0
    """Lowest camera elevation above the table plane, in degrees."""
    elevation_max_deg: float = 60.0
    """Highest camera elevation above the table plane, in degrees."""
    elevation_waves: int = 3
    """Times the elevation goes from lowest to highest and back over one orbit."""
    place_radius: float = 0.14
    """Object centres are drawn inside a disc of this radius (metres); grows by 10 % when objects do not fit."""
    min_gap: float = 0.02
    """Minimum free space between the footprints of two objects (metres)."""
    scale_min: float = 0.8
    """Smallest object scale factor relative to its recipe."""
    scale_max: float = 1.35
    """Largest object scale factor relative to its recipe."""
    max_per_class: int = 2
    """At most this many objects of one class in a scene."""
    min_repeated_classes: int = 1
    """Classes drawn twice (if num_objects and max_per_class allow): colour, size or place must tell them apart."""
    num_points: int = 4000
    """Points in the initial point cloud sparse_pc.ply (back-projected from train-view depth)."""
    object_point_fraction: float = 0.6
    """Share of the initial points taken from object pixels (the rest from the table)."""
    min_visible_pixels: int = 4
    """An object counts as visible in a frame (for expressions) when it covers at least this many pixels."""
    relation_margin: float = 0.03
    """Left/right/front/behind need a centre offset above this (metres); closer pairs are never described."""
    max_relational: int = 8
    """At most this many left_right and this many front_behind expressions per scene."""
    max_paraphrases: int = 6
    """At most this many paraphrase expressions per scene."""
    supersample: int = 3
    """Anti-aliasing: RGB averages supersample x supersample samples per pixel (odd; 1 = off). Depth and labels come
    from the centre sample, exactly at the pixel centre."""
    shadows: bool = True
    """Render cast shadows (view-independent: the light is fixed in the world)."""
    table_size: float = 3.0
    """Side of the square table top under the objects (metres; background, class 0)."""
    near: float = 0.02
    """Near clipping plane of the render camera (metres)."""
    far: float = 20.0
    """Far clipping plane of the render camera (metres); depth beyond it reads as empty (0)."""
    fuse_gaussians: bool = False
    """Also write gaussians.ply: a 3DGS scene fused from the ground-truth RGB-D train views (for methods that start
    from a trained scene, e.g. rtgs2-ext)."""

    def check(self) -> None:
        """Raise ValueError with a clear message for an impossible configuration."""
        from gsstudio_ext.data.synthetic.catalogue import CLASSES, COLOURS

        problems = []
        if self.num_objects < 1:
            problems.append(f"num_objects must be >= 1 (got {self.num_objects})")
        if self.max_per_class < 1 or self.num_objects > self.max_per_class * len(CLASSES):
            problems.append(
                f"num_objects={self.num_objects} needs max_per_class >= {-(-self.num_objects // len(CLASSES))} "
                f"(the catalogue has {len(CLASSES)} classes; max_per_class={self.max_per_class})"
            )
        if self.max_per_class > len(COLOURS):
            problems.append(f"max_per_class must be <= {len(COLOURS)} (objects of a class need distinct colours)")
        if self.width < 8 or self.height < 8:
            problems.append(f"images must be at least 8x8 pixels (got {self.width}x{self.height})")
        if self.num_views < 1:
            problems.append(f"num_views must be >= 1 (got {self.num_views})")
        if self.eval_every < 0 or self.eval_every == 1:
            problems.append(f"eval_every must be 0 (no eval views) or >= 2 (got {self.eval_every})")
        if not 1.0 < self.fov_deg < 170.0:
            problems.append(f"fov_deg must be in (1, 170) (got {self.fov_deg})")
        if self.radius is not None and self.radius <= 0:
            problems.append(f"radius must be positive or None (got {self.radius})")
        if not -89.0 <= self.elevation_min_deg <= self.elevation_max_deg <= 89.0:
            problems.append(
                f"need -89 <= elevation_min_deg <= elevation_max_deg <= 89 "
                f"(got {self.elevation_min_deg}, {self.elevation_max_deg})"
            )
        if not 0 < self.scale_min <= self.scale_max:
            problems.append(f"need 0 < scale_min <= scale_max (got {self.scale_min}, {self.scale_max})")
        if self.num_points < 0 or not 0.0 <= self.object_point_fraction <= 1.0:
            problems.append("num_points must be >= 0 and object_point_fraction in [0, 1]")
        if not 0 < self.near < self.far:
            problems.append(f"need 0 < near < far (got {self.near}, {self.far})")
        if problems:
            raise ValueError("invalid synthetic scene config: " + "; ".join(problems))

    def eval_indices(self) -> Tuple[int, ...]:
        """Orbit indices of the eval views (interleaved with the train views)."""
        if self.eval_every == 0:
            return ()
        return tuple(range(self.eval_every - 1, self.num_views, self.eval_every))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
