"""Stand-in for open3d on the benchmark machine (its wheel is too large to carry there).

It covers only what nerfstudio's dataparser calls to load an initial point cloud: ``io.read_point_cloud(path)``
returning an object with ``points`` [N, 3] and ``colors`` [N, 3] in 0..1.
"""

from types import SimpleNamespace

import numpy as np


def _read_point_cloud(path: str) -> SimpleNamespace:
    from plyfile import PlyData

    vertex = PlyData.read(path)["vertex"]
    points = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)
    names = vertex.data.dtype.names
    if all(c in names for c in ("red", "green", "blue")):
        colors = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1).astype(np.float64) / 255.0
    else:
        colors = np.zeros((0, 3))
    return SimpleNamespace(points=points, colors=colors)


io = SimpleNamespace(read_point_cloud=_read_point_cloud)
