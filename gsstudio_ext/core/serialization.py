"""Space-filling-curve codes of integer 3-D grid coordinates (point-cloud serialization, as PTv3 uses).

Four curve orders are supported: ``"z"`` (Morton / z-order), ``"hilbert"`` (3-D Hilbert, Skilling's transpose
algorithm) and their ``"-trans"`` variants, which swap the x and y axes before encoding. Codes are int64 with
``3 * depth`` bits (``depth <= 16`` bits per axis); an optional batch index is placed above them, so sorting the
codes groups points by sample first and by curve position second.

Both curves visit every aligned cube of side ``2**l`` contiguously, so ``code >> (3 * l)`` is the code of the
point's parent cell ``grid >> l`` along the same curve: pooling can reuse codes instead of re-encoding.

Everything is vectorised over points (loops run only over bits and axes) and device-agnostic.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

CURVE_ORDERS: Tuple[str, ...] = ("z", "z-trans", "hilbert", "hilbert-trans")
"""Curve orders understood by :func:`encode`."""
MAX_DEPTH = 16
"""Bits per axis: codes use 48 bits, leaving 15 bits for the batch index in an int64."""

# Masks of the "magic bits" spread of a 16-bit integer into every third bit of an int64 (LSB first).
_SPREAD = ((16, 0x0000FF0000FF), (8, 0x00F00F00F00F), (4, 0x0C30C30C30C3), (2, 0x249249249249))
# The same steps backwards: (shift right, mask kept).
_COMPACT = ((2, 0x0C30C30C30C3), (4, 0x00F00F00F00F), (8, 0x0000FF0000FF), (16, 0x00000000FFFF))


def _check_depth(depth: int) -> None:
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in [1, {MAX_DEPTH}], got {depth}")


def _check_grid(grid: Tensor, depth: int) -> None:
    _check_depth(depth)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid must have shape [N, 3], got {tuple(grid.shape)}")
    if grid.dtype.is_floating_point or grid.dtype == torch.bool:
        raise TypeError(f"grid must be an integer tensor, got {grid.dtype}")
    if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= 1 << depth):
        raise ValueError(f"grid coordinates must lie in [0, 2**{depth}), got [{int(grid.min())}, {int(grid.max())}]")


def _spread(v: Tensor) -> Tensor:
    """Long[N] 16-bit values -> Long[N] with bit i moved to bit 3 i."""
    v = v & 0xFFFF
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def _compact(v: Tensor) -> Tensor:
    """Inverse of :func:`_spread`: keep every third bit (LSB first) and pack them."""
    v = v & _SPREAD[-1][1]
    for shift, mask in _COMPACT:
        v = (v | (v >> shift)) & mask
    return v


def _interleave(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Bit interleave with ``a`` most significant in each triple: code bits (..., a_i, b_i, c_i, ...)."""
    return (_spread(a) << 2) | (_spread(b) << 1) | _spread(c)


def _deinterleave(code: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _compact(code >> 2), _compact(code >> 1), _compact(code)


def morton_encode(grid: Tensor, depth: int = MAX_DEPTH) -> Tensor:
    """Z-order codes, standard interleave with x the most significant bit of each triple.

    Args:
        grid: Long[N, 3] non-negative integer coordinates below ``2**depth``.
        depth: bits per axis (Morton codes do not depend on it beyond the range check).

    Returns:
        Long[N] codes in ``[0, 2**(3 depth))``; a 2x2x2 grid gets ``4 x + 2 y + z``.
    """
    _check_grid(grid, depth)
    grid = grid.long()
    return _interleave(grid[:, 0], grid[:, 1], grid[:, 2])


def morton_decode(code: Tensor, depth: int = MAX_DEPTH) -> Tensor:
    """Inverse of :func:`morton_encode`: Long[N] -> Long[N, 3]."""
    _check_depth(depth)
    code = code.long() & ((1 << (3 * depth)) - 1)
    return torch.stack(_deinterleave(code), dim=1)


def _invert_or_exchange(x: List[Tensor], q: int, axes: Iterable[int]) -> None:
    """Skilling's per-bit step, in place: where axis i has bit q set, invert the low bits of x[0]; elsewhere
    exchange the low bits of x[0] and x[i] (axis 0 only inverts)."""
    p = q - 1
    for i in axes:
        high = (x[i] & q) != 0
        if i == 0:
            x[0] = torch.where(high, x[0] ^ p, x[0])
            continue
        t = (x[0] ^ x[i]) & p
        x[0], x[i] = torch.where(high, x[0] ^ p, x[0] ^ t), torch.where(high, x[i], x[i] ^ t)


def hilbert_encode(grid: Tensor, depth: int = MAX_DEPTH) -> Tensor:
    """3-D Hilbert codes (Skilling 2004, "Programming the Hilbert curve": axes -> transpose -> index).

    The curve starts at the origin and consecutive codes are face neighbours (L1 distance 1). The curve of a
    given ``depth`` restricted to the corner cube of side ``2**d`` (``d <= depth``) is a Hilbert curve of that
    cube, possibly reflected, so small grids encoded at the default depth keep the locality property.

    Args:
        grid: Long[N, 3] non-negative integer coordinates below ``2**depth``.
        depth: bits per axis.

    Returns:
        Long[N] codes in ``[0, 2**(3 depth))``.
    """
    _check_grid(grid, depth)
    x = [grid[:, i].long() for i in range(3)]
    # Inverse undo of the excess work (rotations/reflections), from the top bit down.
    q = 1 << (depth - 1)
    while q > 1:
        _invert_or_exchange(x, q, range(3))
        q >>= 1
    # Gray encode.
    x[1] = x[1] ^ x[0]
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (depth - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    # The transposed index: bit b of axis i is bit (3 b + 2 - i) of the code.
    return _interleave(x[0], x[1], x[2])


def hilbert_decode(code: Tensor, depth: int = MAX_DEPTH) -> Tensor:
    """Inverse of :func:`hilbert_encode`: Long[N] -> Long[N, 3]."""
    _check_depth(depth)
    code = code.long() & ((1 << (3 * depth)) - 1)
    x = list(_deinterleave(code))
    # Gray decode by H ^ (H / 2).
    top = 2 << (depth - 1)
    t = x[2] >> 1
    x[2] = x[2] ^ x[1]
    x[1] = x[1] ^ x[0]
    x[0] = x[0] ^ t
    # Undo excess work, from the low bits up.
    q = 2
    while q != top:
        _invert_or_exchange(x, q, (2, 1, 0))
        q <<= 1
    return torch.stack(x, dim=1)


def encode(grid: Tensor, order: str = "z", depth: int = MAX_DEPTH, batch: Optional[Tensor] = None) -> Tensor:
    """Curve codes of one order, with the batch index in the high bits.

    Args:
        grid: Long[N, 3] non-negative integer grid coordinates below ``2**depth``.
        order: one of :data:`CURVE_ORDERS`; ``"-trans"`` swaps x and y before encoding.
        depth: bits per axis (<= 16).
        batch: optional Long[N] non-negative sample index, stored at bits ``3 depth`` and above.

    Returns:
        Long[N] codes; sorting them groups points by sample, then orders them along the curve.
    """
    if order not in CURVE_ORDERS:
        raise ValueError(f"unknown curve order {order!r}; expected one of {CURVE_ORDERS}")
    if order.endswith("-trans"):
        grid = grid[:, [1, 0, 2]]
    code = morton_encode(grid, depth) if order.startswith("z") else hilbert_encode(grid, depth)
    if batch is not None:
        if batch.shape != code.shape:
            raise ValueError(f"batch must have shape {tuple(code.shape)}, got {tuple(batch.shape)}")
        if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= 1 << (63 - 3 * depth)):
            raise ValueError(f"batch indices must lie in [0, 2**{63 - 3 * depth})")
        code = code | (batch.long() << (3 * depth))
    return code
