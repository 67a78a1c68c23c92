"""Read and write Gaussian scenes as standard 3DGS ``.ply`` files, with extra per-Gaussian properties.

Layout written (binary little-endian, one ``vertex`` element, float32 unless noted), the one the original 3DGS
code, nerfstudio's ``ns-export gaussian-splat`` and common viewers use::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3 <extras>

- normals are written as zeros and ignored on read;
- ``f_rest`` is channel-major: all K-1 coefficients of R, then G, then B (``f_rest_{c*(K-1)+k}``);
- ``opacity`` is the logit, ``scale_*`` the log scale, ``rot_*`` the wxyz quaternion (unnormalised).

Extras (``GaussianScene.extras``), naming rule:

- a scalar extra ``name`` [N] is one property ``name``; a vector extra ``name`` [N, D] is D properties
  ``name_0 .. name_{D-1}`` (reassembled into [N, D] on read);
- bool and uint8 are stored as ``uchar``, other integers as ``int`` (int32; values must fit), float16/bfloat16/
  float32 as ``float`` and float64 as ``double`` (lossless);
- a header comment ``gsstudio_ext extra <name> <torch dtype> <scalar|D>`` per extra lets :func:`read_ply` restore
  the exact dtype and shape. Files from other tools have no such comment: there, properties ``base_0 ..
  base_{D-1}`` (consecutive from 0, no property named ``base``) become one [N, D] extra, everything else a
  scalar extra, with the file's dtype (uint16 -> int32, uint32 -> int64).

Reading accepts any property order, ascii or binary (either endianness), float or double, missing ``f_rest``
(degree 0), missing normals, and ``red green blue`` instead of ``f_dc_*`` (converted to the DC coefficient).
Core parameters are returned as float32.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from gsstudio_ext.core.atomic import atomic_write
from gsstudio_ext.core.scene import GaussianScene, _sh_degree_from_rest

PathLike = Union[str, os.PathLike]

SH_C0 = 0.28209479177387814
"""Degree-0 real SH basis constant: colour = SH_C0 * f_dc + 0.5."""

_META_TAG = "gsstudio_ext extra"
_NORMALS = ("nx", "ny", "nz")
_REQUIRED = ("x", "y", "z", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
_INDEXED = re.compile(r"^(.+)_(\d+)$")

# PLY type name of each numpy dtype we write.
_PLY_TYPE = {
    np.dtype("uint8"): "uchar",
    np.dtype("int32"): "int",
    np.dtype("float32"): "float",
    np.dtype("float64"): "double",
}


class SceneIOError(ValueError):
    """A scene file is missing required data, malformed, or of the wrong kind."""


# ---------------------------------------------------------------------------------------------------------- writing


def _extra_storage(name: str, value: torch.Tensor) -> np.ndarray:
    """Numpy array in the on-disk dtype for one extra (see the module docstring)."""
    value = value.detach().cpu()
    if value.dtype in (torch.bool, torch.uint8):
        return value.to(torch.uint8).numpy()
    if value.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = np.iinfo(np.int32)
        if value.numel() and (int(value.min()) < info.min or int(value.max()) > info.max):
            raise SceneIOError(f"extra {name!r} has values outside the int32 range a PLY 'int' property holds")
        return value.to(torch.int32).numpy()
    if value.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return value.to(torch.float32).numpy()
    if value.dtype == torch.float64:
        return value.numpy()
    raise SceneIOError(f"extra {name!r} has dtype {value.dtype}, which a PLY file cannot store")


def _scene_columns(scene: GaussianScene) -> Tuple[List[Tuple[str, np.ndarray]], List[str]]:
    """(property name, 1-D column) pairs in file order, and the header comments describing the extras."""
    n = scene.num_gaussians

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().to(torch.float32).numpy().reshape(n, -1)

    columns: List[Tuple[str, np.ndarray]] = []

    def add(prefix_names: Sequence[str], block: np.ndarray) -> None:
        for j, name in enumerate(prefix_names):
            columns.append((name, block[:, j]))

    add(("x", "y", "z"), f32(scene.means))
    add(_NORMALS, np.zeros((n, 3), dtype=np.float32))
    add(("f_dc_0", "f_dc_1", "f_dc_2"), f32(scene.sh_dc))
    rest = f32(scene.sh_rest.transpose(1, 2))  # [N, 3, K-1] -> channel-major flattening
    add([f"f_rest_{i}" for i in range(rest.shape[1])], rest)
    add(("opacity",), f32(scene.opacity_logits))
    add(("scale_0", "scale_1", "scale_2"), f32(scene.log_scales))
    add(("rot_0", "rot_1", "rot_2", "rot_3"), f32(scene.quats))

    comments = []
    for name, value in scene.extras.items():
        data = _extra_storage(name, value)
        dtype_name = str(value.dtype).replace("torch.", "")
        if data.ndim == 1:
            columns.append((name, data))
            comments.append(f"{_META_TAG} {name} {dtype_name} scalar")
        else:
            if data.shape[1] == 0:
                raise SceneIOError(f"extra {name!r} has zero columns; a PLY file cannot store it")
            add([f"{name}_{j}" for j in range(data.shape[1])], data)
            comments.append(f"{_META_TAG} {name} {dtype_name} {data.shape[1]}")

    seen = set()
    for name, _ in columns:
        if name in seen:
            raise SceneIOError(f"PLY property {name!r} would be written twice; rename the extra that produces it")
        seen.add(name)
    return columns, comments


def _header(num: int, columns: Sequence[Tuple[str, np.ndarray]], comments: Sequence[str]) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", "comment written by gsstudio_ext"]
    lines += [f"comment {c}" for c in comments]
    lines.append(f"element vertex {num}")
    lines += [f"property {_PLY_TYPE[col.dtype]} {name}" for name, col in columns]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def _write_payload(handle, header: bytes, records: np.ndarray) -> None:
    """Write header and vertex records (a separate function so tests can make a write fail midway)."""
    handle.write(header)
    handle.write(records.tobytes())


def write_ply(path: PathLike, scene: GaussianScene, comments: Sequence[str] = ()) -> Path:
    """Write ``scene`` (validated first) as a binary little-endian 3DGS PLY, atomically.

    The file is written to a temporary file in the same folder and renamed over ``path``, so a failure never
    leaves a partial file and never touches an existing one. ``comments`` are extra header comment lines.
    Returns the path written.
    """
    path = Path(path)
    scene.validate()
    for comment in comments:
        if "\n" in comment or "\r" in comment:
            raise SceneIOError("PLY header comments must be single lines")
    columns, extra_comments = _scene_columns(scene)
    records = np.empty(scene.num_gaussians, dtype=[(name, col.dtype.newbyteorder("<")) for name, col in columns])
    for name, col in columns:
        records[name] = col
    header = _header(scene.num_gaussians, columns, [*comments, *extra_comments])

    return atomic_write(path, lambda handle: _write_payload(handle, header, records))


# ---------------------------------------------------------------------------------------------------------- reading


def _native(column: np.ndarray) -> np.ndarray:
    """A contiguous copy in native byte order, with dtypes torch cannot hold widened."""
    column = np.asarray(column)
    widen = {np.dtype("uint16"): np.int32, np.dtype("uint32"): np.int64, np.dtype("uint64"): np.int64}
    target = widen.get(column.dtype.newbyteorder("="), column.dtype.newbyteorder("="))
    return np.ascontiguousarray(column.astype(target, copy=True))


def _parse_meta(comments: Sequence[str]) -> Dict[str, Tuple[str, Optional[int]]]:
    """name -> (torch dtype name, D or None for scalar) from our header comments."""
    meta = {}
    for comment in comments:
        parts = comment.split()
        if " ".join(parts[:2]) != _META_TAG or len(parts) != 5:
            continue
        _, _, name, dtype_name, shape = parts
        if isinstance(getattr(torch, dtype_name, None), torch.dtype):
            meta[name] = (dtype_name, None if shape == "scalar" else int(shape))
    return meta


def _indexed_group(base: str, names: Sequence[str]) -> List[str]:
    """Properties ``base_0 .. base_{D-1}`` present in ``names`` (stops at the first gap)."""
    present = set(names)
    group = []
    while f"{base}_{len(group)}" in present:
        group.append(f"{base}_{len(group)}")
    return group


def _read_extras(data: np.ndarray, names: Sequence[str], comments: Sequence[str]) -> Dict[str, torch.Tensor]:
    meta = _parse_meta(comments)
    extras: Dict[str, torch.Tensor] = {}
    used = set()
    for name, (dtype_name, dim) in meta.items():
        cols = [name] if dim is None else [f"{name}_{j}" for j in range(dim)]
        if not all(c in names and c not in used for c in cols):
            continue  # comment does not match the properties (file edited by another tool): use the generic rule
        block = np.stack([_native(data[c]) for c in cols], axis=1) if dim is not None else _native(data[name])
        extras[name] = torch.from_numpy(block).to(getattr(torch, dtype_name))
        used.update(cols)

    # Generic rule for the rest: base_0 .. base_{D-1} -> [N, D] (first pass), every other property -> [N].
    remaining = [n for n in names if n not in used]
    for name in remaining:
        match = _INDEXED.match(name)
        if not match or match.group(2) != "0" or name in used:
            continue
        base = match.group(1)
        if base in remaining or base in extras:
            continue
        group = _indexed_group(base, [n for n in remaining if n not in used])
        columns = [_native(data[c]) for c in group]
        common = np.result_type(*columns)
        extras[base] = torch.from_numpy(np.stack([c.astype(common) for c in columns], axis=1))
        used.update(group)
    for name in remaining:
        if name not in used:
            extras[name] = torch.from_numpy(_native(data[name]))
    return extras


def _load_plydata(path: Path):
    try:
        from plyfile import PlyData
    except ImportError as err:  # pragma: no cover - plyfile is a declared dependency
        raise ImportError("reading PLY files needs the 'plyfile' package: pip install plyfile") from err
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic[:3] != b"ply" or magic[3:4] not in (b"\n", b"\r"):
        raise SceneIOError(f"{path} is not a PLY file (it does not start with 'ply')")
    try:
        return PlyData.read(str(path))
    except Exception as err:  # plyfile raises several exception types for malformed files
        raise SceneIOError(f"malformed PLY file {path}: {err}") from err


def read_ply(path: PathLike) -> GaussianScene:
    """Read a 3DGS PLY (ours or another tool's) into a :class:`GaussianScene` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no PLY file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    ply = _load_plydata(path)
    try:
        vertex = ply["vertex"]
    except KeyError:
        found = [el.name for el in ply.elements]
        raise SceneIOError(f"{path} has no 'vertex' element (elements: {found}); not a Gaussian splat file") from None
    data = vertex.data
    names = [p.name for p in vertex.properties if data.dtype[p.name].shape == () and data.dtype[p.name].kind != "O"]
    present = set(names)

    has_dc = all(f"f_dc_{i}" in present for i in range(3))
    has_rgb = all(c in present for c in ("red", "green", "blue"))
    missing = [p for p in _REQUIRED if p not in present]
    if not has_dc and not has_rgb:
        missing.append("f_dc_0..2 (or red, green, blue)")
    if missing:
        raise SceneIOError(
            f"{path} is not a 3D Gaussian splat PLY: missing properties {missing}; it has {names[:24]}"
            + (" ..." if len(names) > 24 else "")
        )

    n = len(data)

    def block(cols: Sequence[str]) -> torch.Tensor:
        arr = np.stack([_native(data[c]).astype(np.float32) for c in cols], axis=1) if cols else None
        return torch.from_numpy(arr) if arr is not None else torch.zeros(n, 0)

    rest_names = _indexed_group("f_rest", names)
    stray = [p for p in names if p.startswith("f_rest_") and p not in rest_names]
    if stray:
        raise SceneIOError(f"{path}: f_rest properties are not numbered 0..M-1 (unexpected {stray[:4]})")
    num_rest = len(rest_names)
    degree = _sh_degree_from_rest(num_rest // 3) if num_rest % 3 == 0 else -1
    if degree < 0:
        raise SceneIOError(f"{path}: {num_rest} f_rest properties do not match any SH degree (expected 3*((d+1)^2-1))")
    k_rest = num_rest // 3
    sh_rest = block(rest_names).reshape(n, 3, k_rest).transpose(1, 2).contiguous()

    consumed = set(_REQUIRED) | set(_NORMALS) | set(rest_names)
    if has_dc:
        sh_dc = block(["f_dc_0", "f_dc_1", "f_dc_2"])
        consumed |= {"f_dc_0", "f_dc_1", "f_dc_2"}
    else:
        rgb = block(["red", "green", "blue"])
        if np.issubdtype(data["red"].dtype, np.integer):
            rgb = rgb / float(np.iinfo(data["red"].dtype).max)
        sh_dc = (rgb - 0.5) / SH_C0
        consumed |= {"red", "green", "blue"}

    scene = GaussianScene(
        means=block(["x", "y", "z"]),
        quats=block(["rot_0", "rot_1", "rot_2", "rot_3"]),
        log_scales=block(["scale_0", "scale_1", "scale_2"]),
        opacity_logits=block(["opacity"])[:, 0].contiguous(),
        sh_dc=sh_dc,
        sh_rest=sh_rest,
        extras=_read_extras(data, [p for p in names if p not in consumed], list(ply.comments)),
    )
    return scene
