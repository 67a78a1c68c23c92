"""Render a planned scene with pybullet's CPU TinyRenderer: RGB, metric depth, object ids and part ids per pixel.

Each piece of each object is its own pybullet body, so the renderer's object segmentation gives the part of every
pixel exactly (and through it the object). TinyRenderer does no anti-aliasing: colour, depth and segmentation
come from the same sample at each pixel centre, so masks align with RGB pixel for pixel. The light is fixed in
the world (shading and shadows do not change with the view) and has no specular term. Spheres use pybullet_data's
smooth sphere mesh and cylinders a generated prism mesh (pybullet's own cylinder grows by a 1 mm margin), so the
drawn geometry matches :func:`catalogue.piece_local_points` exactly.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from gsstudio_ext.data.synthetic import catalogue, textures
from gsstudio_ext.data.synthetic.cameras import (
    Intrinsics,
    depth_buffer_to_z,
    pybullet_projection_matrix,
    pybullet_view_matrix,
    scaled_intrinsics,
)
from gsstudio_ext.data.synthetic.layout import PlacedPiece, SceneLayout

LIGHT_DIRECTION = (0.4, -0.6, 1.0)
"""Direction towards the light, world frame."""
LIGHT_AMBIENT = 0.55
LIGHT_DIFFUSE = 0.5
TEXTURE_SIZE = 64
TABLE_TEXTURE_SIZE = 512


def cylinder_obj(segments: int = catalogue.CYLINDER_SEGMENTS) -> str:
    """Wavefront OBJ text of a closed cylinder, radius 1, length 1 along z (centred), with UVs and normals."""
    v, vt, vn, faces = [], [], [], []
    angles = [2 * np.pi * i / segments for i in range(segments + 1)]  # seam column repeated for the UV wrap
    for z in (-0.5, 0.5):
        for i, a in enumerate(angles):
            v.append((np.cos(a), np.sin(a), z))
            vt.append((i / segments, z + 0.5))
            vn.append((np.cos(a), np.sin(a), 0.0))
    ring = segments + 1
    for i in range(segments):  # side quads as two counter-clockwise triangles (seen from outside)
        b0, b1, t0, t1 = i, i + 1, ring + i, ring + i + 1
        faces += [(b0, b1, t1), (b0, t1, t0)]
    for z, sign in ((-0.5, -1.0), (0.5, 1.0)):
        centre = len(v)
        v.append((0.0, 0.0, z))
        vt.append((0.5, 0.5))
        vn.append((0.0, 0.0, sign))
        for a in angles[:-1]:
            v.append((np.cos(a), np.sin(a), z))
            vt.append((0.5 + 0.5 * np.cos(a), 0.5 + 0.5 * np.sin(a)))
            vn.append((0.0, 0.0, sign))
        for i in range(segments):
            a, b = centre + 1 + i, centre + 1 + (i + 1) % segments
            faces.append((centre, a, b) if sign > 0 else (centre, b, a))
    lines = [f"v {x:.9f} {y:.9f} {z:.9f}" for x, y, z in v]
    lines += [f"vt {a:.9f} {b:.9f}" for a, b in vt]
    lines += [f"vn {x:.9f} {y:.9f} {z:.9f}" for x, y, z in vn]
    lines += ["f " + " ".join(f"{k + 1}/{k + 1}/{k + 1}" for k in face) for face in faces]
    return "\n".join(lines) + "\n"


@dataclass
class Frame:
    """One rendered view."""

    rgb: np.ndarray
    """uint8 [H, W, 3]."""
    depth: np.ndarray
    """float64 [H, W] metric z-depth in metres; 0 where nothing was hit (sky)."""
    object_ids: np.ndarray
    """int32 [H, W]; 0 = table or sky."""
    part_ids: np.ndarray
    """int32 [H, W] global part ids; 0 = table or sky."""


def _quaternion(rot: np.ndarray) -> Tuple[float, float, float, float]:
    """(x, y, z, w) quaternion of a rotation matrix [3, 3]."""
    m = rot
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = ((m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s)
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = (0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s)
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = ((m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s)
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = ((m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s)
    return tuple(float(x) for x in q)  # type: ignore[return-value]


def import_pybullet():
    """Import pybullet without the "build time" banner its C code writes to stderr (noise in CLI and test output)."""
    if "pybullet" in sys.modules:
        return sys.modules["pybullet"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import pybullet
    except ImportError as err:
        raise ImportError("the synthetic generator needs pybullet: pip install 'gsstudio_ext[synthetic]'") from err
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return pybullet


class SceneRenderer:
    """A pybullet DIRECT session holding one scene; use as a context manager (``with SceneRenderer(...) as r``)."""

    def __init__(
        self,
        layout: SceneLayout,
        intrinsics: Intrinsics,
        seed: int,
        near: float,
        far: float,
        table_size: float = 3.0,
        shadows: bool = True,
        supersample: int = 1,
    ) -> None:
        if supersample < 1 or supersample % 2 == 0:
            raise ValueError(f"supersample must be an odd positive integer, got {supersample}")
        self.layout = layout
        self.intrinsics = intrinsics
        self.seed = seed
        self.near, self.far = near, far
        self.table_size = table_size
        self.shadows = shadows
        self.supersample = supersample
        self._client = -1
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._body_part: Dict[int, Tuple[int, int]] = {}

    def __enter__(self) -> "SceneRenderer":
        p = import_pybullet()
        self._p = p
        self._client = p.connect(p.DIRECT)
        self._tmp = tempfile.TemporaryDirectory(prefix="gs_synth_tex_")
        self._cylinder = Path(self._tmp.name) / "cylinder.obj"
        self._cylinder.write_text(cylinder_obj())
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 2]))
        self._add_table(rng)
        for index, piece in enumerate(self.layout.pieces):
            body = self._add_piece(piece, rng, index)
            self._body_part[body] = (piece.object_id, piece.part_id)
        return self

    def __exit__(self, *exc) -> None:
        if self._client >= 0:
            self._p.disconnect(physicsClientId=self._client)
            self._client = -1
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _texture(self, name: str, rgb: np.ndarray) -> int:
        assert self._tmp is not None
        path = Path(self._tmp.name) / f"{name}.png"
        Image.fromarray(rgb).save(path)
        return self._p.loadTexture(str(path), physicsClientId=self._client)

    def _add_table(self, rng: np.random.Generator) -> None:
        p, half = self._p, self.table_size / 2
        shape = p.createVisualShape(
            p.GEOM_BOX, halfExtents=[half, half, 0.01], rgbaColor=[1, 1, 1, 1], physicsClientId=self._client
        )
        body = p.createMultiBody(
            baseMass=0, baseVisualShapeIndex=shape, basePosition=[0, 0, -0.01], physicsClientId=self._client
        )
        tex = textures.table_texture(catalogue.TABLE_COLOUR, rng, TABLE_TEXTURE_SIZE, planks=int(self.table_size * 8))
        p.changeVisualShape(body, -1, textureUniqueId=self._texture("table", tex), physicsClientId=self._client)

    def _add_piece(self, pp: PlacedPiece, rng: np.random.Generator, index: int) -> int:
        p, piece, s = self._p, pp.piece, pp.scale
        kwargs = {"rgbaColor": [1, 1, 1, 1], "physicsClientId": self._client}
        if piece.shape == "box":
            shape = p.createVisualShape(p.GEOM_BOX, halfExtents=[v * s for v in piece.size], **kwargs)
        elif piece.shape == "sphere":  # pybullet's GEOM_SPHERE is coarse; its smooth UV sphere mesh has radius 1
            shape = p.createVisualShape(
                p.GEOM_MESH,
                fileName=str(catalogue.data_path() / catalogue.SPHERE_MESH),
                meshScale=[piece.size[0] * s] * 3,
                **kwargs,
            )
        elif piece.shape == "cylinder":
            radius, length = piece.size[0] * s, piece.size[1] * s
            shape = p.createVisualShape(
                p.GEOM_MESH, fileName=str(self._cylinder), meshScale=[radius, radius, length], **kwargs
            )
        elif piece.shape == "mesh":
            shape = p.createVisualShape(
                p.GEOM_MESH,
                fileName=str(catalogue.data_path() / piece.mesh),
                meshScale=[v * s for v in piece.size],
                **kwargs,
            )
        else:
            raise ValueError(f"unknown piece shape '{piece.shape}'")
        body = p.createMultiBody(
            baseMass=0,
            baseVisualShapeIndex=shape,
            basePosition=pp.position.tolist(),
            baseOrientation=_quaternion(pp.rotation),
            physicsClientId=self._client,
        )
        tex = textures.make_texture(pp.colour, pp.pattern, rng, TEXTURE_SIZE)
        p.changeVisualShape(
            body, -1, textureUniqueId=self._texture(f"piece_{index:04d}", tex), physicsClientId=self._client
        )
        return body

    def render(self, c2w: np.ndarray) -> Frame:
        """Render the view of OpenGL camera-to-world ``c2w`` [4, 4].

        With ``supersample`` s > 1 the view is rendered at s times the resolution: RGB is the mean of each s x s
        block (anti-aliased, like a real sensor), depth and labels are its centre sample, which lies exactly on
        the pixel centre, so labels stay exact.
        """
        s = self.supersample
        frame = self._render_at(c2w, scaled_intrinsics(self.intrinsics, s))
        if s == 1:
            return frame
        h, w = self.intrinsics.height, self.intrinsics.width
        blocks = frame.rgb.reshape(h, s, w, s, 3).astype(np.float64).mean(axis=(1, 3))
        centre = (slice(s // 2, None, s), slice(s // 2, None, s))
        return Frame(
            rgb=np.round(blocks).astype(np.uint8),
            depth=frame.depth[centre],
            object_ids=frame.object_ids[centre],
            part_ids=frame.part_ids[centre],
        )

    def _render_at(self, c2w: np.ndarray, intr: Intrinsics) -> Frame:
        p = self._p
        _, _, rgba, depth, seg = p.getCameraImage(
            intr.width,
            intr.height,
            viewMatrix=pybullet_view_matrix(c2w),
            projectionMatrix=pybullet_projection_matrix(intr, self.near, self.far),
            renderer=p.ER_TINY_RENDERER,
            flags=p.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX,
            shadow=int(self.shadows),
            lightDirection=list(LIGHT_DIRECTION),
            lightColor=[1.0, 1.0, 1.0],
            lightAmbientCoeff=LIGHT_AMBIENT,
            lightDiffuseCoeff=LIGHT_DIFFUSE,
            lightSpecularCoeff=0.0,
            physicsClientId=self._client,
        )
        shape = (intr.height, intr.width)
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(*shape, 4)[..., :3].copy()
        z = depth_buffer_to_z(np.asarray(depth, dtype=np.float32).reshape(shape), self.near, self.far)
        seg = np.asarray(seg, dtype=np.int64).reshape(shape)
        body = np.where(seg >= 0, seg & ((1 << 24) - 1), -1)
        lut_size = max(self._body_part, default=0) + 2
        object_lut = np.zeros(lut_size, dtype=np.int32)
        part_lut = np.zeros(lut_size, dtype=np.int32)
        for uid, (obj, part) in self._body_part.items():
            object_lut[uid], part_lut[uid] = obj, part
        body = np.where((body >= 0) & (body < lut_size), body, lut_size - 1)  # the table / sky -> last entry (0)
        return Frame(rgb=rgb, depth=z, object_ids=object_lut[body], part_ids=part_lut[body])
