"""Compatibility with the library versions nerfstudio 1.1.5 meets in practice."""

from __future__ import annotations

import numpy as np
import torch


def allow_numpy_scalars_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` (the default since torch 2.6) read nerfstudio checkpoints.

    nerfstudio's schedulers compute learning rates with numpy, so checkpoints hold numpy float64 scalars, and
    nerfstudio 1.1.5 calls ``torch.load`` without ``weights_only=False``: ns-eval, ns-render and resuming fail with
    "Unsupported global: numpy._core.multiarray.scalar". Allow-listing those plain-data types fixes that safely.
    """
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 does not restrict loading
        return
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        from numpy._core.multiarray import scalar
    else:
        from numpy.core.multiarray import scalar
    add([scalar, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.int64))])
