"""RT-GS2 Stage A backbone: a PTv3-style serialized-attention point U-Net in pure torch (spec §4.3, §4.8-4.9).

Pointcept's PointTransformerV3 needs spconv and flash-attn and is not on the package registry, so this is our own
re-implementation of its structure, running on CPU and GPU:

- grid coordinates ``floor((xyz - per-sample min) / grid_size)``; 4 space-filling-curve codes per point
  (:mod:`gsstudio_ext.core.serialization`), reused as ``code >> 3`` after every pooling;
- embedding: Linear + LayerNorm + GELU per point;
- encoder stages separated by grid pooling with stride 2 (points sharing a coarser voxel merge by a max of a
  linear projection; the parent index is kept for unpooling);
- blocks: conditional positional encoding (CPE), pre-norm serialized patch attention, pre-norm MLP, drop-path.
  Each block sorts points by one curve (cycling through ``orders``; shuffled per forward while training, as PTv3
  does), cuts each sample's sequence into patches of ``patch_size`` (the last patch of a sample is partial and
  masked; a patch never mixes samples) and runs ``scaled_dot_product_attention`` per patch. Full patches go
  through unmasked SDPA, so CUDA picks flash / memory-efficient kernels: memory is O(N * patch_size), never N x N;
- CPE without spconv: a depthwise 3x3x3 sparse convolution by voxel hashing (per-channel weights per offset over
  the voxel means of the 26 face/edge/corner neighbours and the point's own voxel), then Linear + LayerNorm.
  PTv3's CPE is a full submanifold conv; depthwise + Linear is its separable form and keeps true 3-D
  neighbourhoods (a 1-D conv along the curve would not);
- decoder: unpool by parent index, add the projected skip connection, decoder blocks, LayerNorm + Linear head.

Determinism: points are first put into a canonical order (lexicographic in voxel, features, coordinates) and
every later sort is stable, so the output is permutation-equivariant even when points share a voxel. The only
ties left are exact duplicates (same coordinates and features); they get equal outputs unless a patch boundary
falls between them. All norms are per point and patches never cross samples, so samples never interact.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsstudio_ext.core.serialization import CURVE_ORDERS, MAX_DEPTH, encode

_BATCH_SHIFT = 3 * MAX_DEPTH  # batch index bits sit above the 48 curve-code bits
_AXIS = 1 << MAX_DEPTH  # grid extent per axis
_OFFSETS = list(itertools.product((-1, 0, 1), repeat=3))  # the 27 CPE neighbour offsets
_CPU_SCORE_BUDGET = 1 << 25  # attention-score entries per SDPA call off CUDA (the math kernel builds them)


@dataclass
class PointBackboneConfig:
    """PTv3-style backbone (defaults are Pointcept's, as RT-GS2 trains them; spec §4.3)."""

    in_channels: int = 10
    """Input channels per point: xyz, rgb, opacity, log-scale."""
    out_channels: int = 32
    """Output feature size per point."""
    grid_size: float = 0.07
    """Voxel size of the integer grid coordinates (scene units)."""
    enc_depths: Tuple[int, ...] = (2, 2, 2, 6, 2)
    """Blocks per encoder stage (finest first); stages are separated by stride-2 grid pooling."""
    enc_channels: Tuple[int, ...] = (32, 64, 128, 256, 512)
    """Widths of the encoder stages."""
    enc_heads: Tuple[int, ...] = (2, 4, 8, 16, 32)
    """Attention heads per encoder stage."""
    dec_depths: Tuple[int, ...] = (2, 2, 2, 2)
    """Blocks per decoder stage (finest first); one fewer stage than the encoder."""
    dec_channels: Tuple[int, ...] = (32, 64, 128, 256)
    """Decoder widths (finest first); the output head maps dec_channels[0] to out_channels."""
    dec_heads: Tuple[int, ...] = (2, 4, 8, 16)
    """Attention heads per decoder stage."""
    patch_size: int = 1024
    """Points per attention patch along the serialized sequence of each sample."""
    orders: Tuple[str, ...] = ("z", "z-trans", "hilbert", "hilbert-trans")
    """Curve orders; block i uses orders[i % len(orders)]."""
    drop_path: float = 0.3
    """Largest stochastic-depth rate (linear over the encoder and the decoder blocks as in PTv3; drops per point,
    as PTv3's DropPath on [N, C] features does)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the block width."""
    shuffle_orders: bool = True
    """Shuffle the order of the curves once per forward while training (PTv3's shuffle_orders)."""

    @classmethod
    def tiny(cls) -> "PointBackboneConfig":
        """3 stages, widths 16/32/64, one block each, patch 64, no drop-path: for CPU tests."""
        return cls(
            enc_depths=(1, 1, 1),
            enc_channels=(16, 32, 64),
            enc_heads=(1, 2, 4),
            dec_depths=(1, 1),
            dec_channels=(16, 32),
            dec_heads=(1, 2),
            patch_size=64,
            drop_path=0.0,
        )

    def validate(self) -> None:
        """Raise ValueError on inconsistent stage tuples or unknown orders."""
        stages = len(self.enc_depths)
        if stages < 1 or len(self.enc_channels) != stages or len(self.enc_heads) != stages:
            raise ValueError("enc_depths, enc_channels and enc_heads must have the same non-zero length")
        if not (len(self.dec_depths) == len(self.dec_channels) == len(self.dec_heads) == stages - 1):
            raise ValueError(f"decoder tuples must have {stages - 1} entries (one fewer than the encoder)")
        for c, h in zip(self.enc_channels + self.dec_channels, self.enc_heads + self.dec_heads):
            if c % h:
                raise ValueError(f"width {c} is not divisible by its {h} heads")
        if not self.orders or any(o not in CURVE_ORDERS for o in self.orders):
            raise ValueError(f"orders must be a non-empty subset of {CURVE_ORDERS}, got {self.orders}")
        if self.patch_size < 1 or self.grid_size <= 0:
            raise ValueError("patch_size must be >= 1 and grid_size > 0")


@dataclass
class _Patches:
    """Patch layout of one level for one curve order."""

    slot: Tensor  # Long[M]: row of each point in the padded [num_patches * P] buffer
    num_full: int  # patches without padding come first ...
    valid: Tensor  # Bool[num_partial, P]: ... then one partial patch per sample whose size is not a multiple of P


@dataclass
class _Level:
    """Points of one resolution level: level l holds cells of side grid_size * 2**l."""

    batch: Tensor  # Long[M]
    grid: Tensor  # Long[M, 3]
    codes: Tensor  # Long[K, M] curve codes without the batch bits
    num_samples: int
    parent: Optional[Tensor] = None  # Long[M_finer]: index of each finer-level point's cell in this level
    patches: Dict[int, _Patches] = field(default_factory=dict)
    cpe_table: Optional[Tuple[Tensor, Tensor]] = None

    def patch_layout(self, k: int, size: int) -> _Patches:
        """Cut each sample's sequence along curve ``k`` into patches of ``size`` (cached)."""
        if k not in self.patches:
            order = torch.sort((self.batch << _BATCH_SHIFT) | self.codes[k], stable=True).indices
            counts = torch.bincount(self.batch, minlength=self.num_samples)
            b = self.batch[order]
            rank = torch.arange(order.numel(), device=order.device) - (torch.cumsum(counts, 0) - counts)[b]
            n_full, rest = counts // size, counts % size
            has_part = (rest > 0).long()
            num_full = int(n_full.sum())
            patch = torch.where(
                rank // size < n_full[b],
                (torch.cumsum(n_full, 0) - n_full)[b] + rank // size,
                num_full + (torch.cumsum(has_part, 0) - has_part)[b],
            )
            slot = torch.empty_like(order)
            slot[order] = patch * size + rank % size
            part_len = rest[rest > 0]
            valid = torch.arange(size, device=order.device)[None, :] < part_len[:, None]
            self.patches[k] = _Patches(slot=slot, num_full=num_full, valid=valid)
        return self.patches[k]

    def neighbours(self) -> Tuple[Tensor, Tensor]:
        """(voxel Long[M], nbr Long[V, 27]): each point's voxel and each voxel's 27 neighbours (V = missing)."""
        if self.cpe_table is None:
            g = self.grid
            key = (((self.batch * _AXIS + g[:, 0]) * _AXIS + g[:, 1]) * _AXIS) + g[:, 2]
            ukey, voxel = torch.unique(key, sorted=True, return_inverse=True)
            vgrid = torch.zeros(ukey.numel(), 3, dtype=g.dtype, device=g.device).index_copy_(0, voxel, g)
            nbr = []
            for off in _OFFSETS:
                ng = vgrid + torch.tensor(off, device=g.device)
                query = ukey + (off[0] * _AXIS + off[1]) * _AXIS + off[2]
                pos = torch.searchsorted(ukey, query).clamp_max(ukey.numel() - 1)
                found = (ukey[pos] == query) & ((ng >= 0) & (ng < _AXIS)).all(1)
                nbr.append(torch.where(found, pos, ukey.numel()))
            self.cpe_table = (voxel, torch.stack(nbr, 1))
        return self.cpe_table


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per point (row of x)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, device=x.device, dtype=x.dtype) >= p
    return x * keep / (1.0 - p)


class _SparseCPE(nn.Module):
    """Conditional positional encoding: depthwise 3x3x3 sparse conv on voxel means, then Linear + LayerNorm."""

    def __init__(self, channels: int):
        super().__init__()
        bound = 1.0 / math.sqrt(len(_OFFSETS))
        self.weight = nn.Parameter(torch.empty(len(_OFFSETS), channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.linear = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor, level: _Level) -> Tensor:
        voxel, nbr = level.neighbours()
        num_vox = nbr.shape[0]
        counts = torch.bincount(voxel, minlength=num_vox).clamp_min(1).to(x.dtype)
        means = x.new_zeros(num_vox + 1, x.shape[1]).index_add_(0, voxel, x)  # last row: missing neighbour
        means = means / torch.cat([counts, counts.new_ones(1)])[:, None]
        gathered = means.index_select(0, nbr.reshape(-1)).view(num_vox, len(_OFFSETS), -1)  # [V, 27, C]
        out = (gathered * self.weight).sum(1) + self.bias
        return self.norm(self.linear(out.index_select(0, voxel)))


class _SerializedAttention(nn.Module):
    """Multi-head self-attention inside patches of the serialized sequence (one curve order)."""

    def __init__(self, channels: int, heads: int, patch_size: int):
        super().__init__()
        self.heads, self.patch_size = heads, patch_size
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, level: _Level, order: int) -> Tensor:
        m, c = x.shape
        size, heads = self.patch_size, self.heads
        layout = level.patch_layout(order, size)
        num_patches = layout.num_full + layout.valid.shape[0]
        buf = x.new_zeros(num_patches * size, 3 * c).index_copy(0, layout.slot, self.qkv(x))
        q, k, v = buf.view(num_patches, size, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # [P', H, S, d] each
        chunk = num_patches if x.is_cuda else max(1, _CPU_SCORE_BUDGET // (heads * size * size))
        outs: List[Tensor] = []
        for start in range(0, num_patches, chunk):
            stop = min(start + chunk, num_patches)
            full_stop = min(stop, layout.num_full)
            if start < full_stop:  # unmasked: flash / memory-efficient kernels on CUDA
                outs.append(F.scaled_dot_product_attention(q[start:full_stop], k[start:full_stop], v[start:full_stop]))
            lo = max(start, layout.num_full)
            if lo < stop:  # partial patches: mask the padded keys
                mask = layout.valid[lo - layout.num_full : stop - layout.num_full, None, None, :]
                outs.append(F.scaled_dot_product_attention(q[lo:stop], k[lo:stop], v[lo:stop], attn_mask=mask))
        out = torch.cat(outs).transpose(1, 2).reshape(num_patches * size, c)
        return self.proj(out.index_select(0, layout.slot))


class _Block(nn.Module):
    """x += CPE(x); x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x)))."""

    def __init__(self, channels: int, heads: int, patch_size: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.cpe = _SparseCPE(channels)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = _SerializedAttention(channels, heads, patch_size)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.drop_path = drop_path

    def forward(self, x: Tensor, level: _Level, order: int) -> Tensor:
        x = x + self.cpe(x, level)
        x = x + _drop_path(self.attn(self.norm1(x), level, order), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _linear_norm_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.LayerNorm(cout), nn.GELU())


def _pool_level(level: _Level) -> _Level:
    """Stride-2 grid pooling: merge the points whose ``grid >> 1`` cell coincides (per sample)."""
    key = (level.batch << _BATCH_SHIFT) | (level.codes[0] >> 3)
    ukey, parent = torch.unique(key, sorted=True, return_inverse=True)
    n = ukey.numel()
    codes = torch.zeros(level.codes.shape[0], n, dtype=torch.long, device=key.device)
    codes = codes.index_copy_(1, parent, level.codes >> 3)
    grid = torch.zeros(n, 3, dtype=torch.long, device=key.device).index_copy_(0, parent, level.grid >> 1)
    return _Level(batch=ukey >> _BATCH_SHIFT, grid=grid, codes=codes, num_samples=level.num_samples, parent=parent)


def _segment_max(x: Tensor, index: Tensor, size: int) -> Tensor:
    out = x.new_zeros(size, x.shape[1])
    return out.scatter_reduce(0, index[:, None].expand_as(x), x, reduce="amax", include_self=False)


def _lexsort(keys: List[Tensor]) -> Tensor:
    """Permutation sorting rows lexicographically by ``keys`` (first key most significant), stable."""
    perm = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        perm = perm[torch.sort(key[perm], stable=True).indices]
    return perm


class PointBackbone(nn.Module):
    """PTv3-style serialized-attention U-Net over points: [N, in_channels] -> [N, out_channels]."""

    def __init__(self, config: PointBackboneConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.embedding = _linear_norm_act(cfg.in_channels, cfg.enc_channels[0])
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.enc_depths)).tolist()
        self.pools = nn.ModuleList(
            _linear_norm_act(cfg.enc_channels[s - 1], cfg.enc_channels[s]) for s in range(1, len(cfg.enc_depths))
        )
        self.enc = nn.ModuleList()
        for s, depth in enumerate(cfg.enc_depths):
            first = sum(cfg.enc_depths[:s])
            self.enc.append(
                nn.ModuleList(
                    _Block(cfg.enc_channels[s], cfg.enc_heads[s], cfg.patch_size, cfg.mlp_ratio, rates[first + i])
                    for i in range(depth)
                )
            )
        # Decoder stage s (finest first) unpools from level s + 1 to level s.
        coarse = list(cfg.dec_channels[1:]) + [cfg.enc_channels[-1]]
        self.unpool_proj = nn.ModuleList(_linear_norm_act(coarse[s], cfg.dec_channels[s]) for s in range(len(coarse)))
        self.unpool_skip = nn.ModuleList(
            _linear_norm_act(cfg.enc_channels[s], cfg.dec_channels[s]) for s in range(len(coarse))
        )
        dec_rates = torch.linspace(0, cfg.drop_path, sum(cfg.dec_depths)).tolist()
        self.dec = nn.ModuleList()
        for s, depth in enumerate(cfg.dec_depths):
            stage_rates = dec_rates[sum(cfg.dec_depths[:s]) : sum(cfg.dec_depths[: s + 1])][::-1]
            self.dec.append(
                nn.ModuleList(
                    _Block(cfg.dec_channels[s], cfg.dec_heads[s], cfg.patch_size, cfg.mlp_ratio, rate)
                    for rate in stage_rates
                )
            )
        width = cfg.dec_channels[0] if cfg.dec_channels else cfg.enc_channels[0]
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.out_channels))

    def _level0(self, coords: Tensor, feats: Tensor, batch: Tensor, num_samples: int) -> Tuple[_Level, Tensor]:
        """Grid coordinates, curve codes and the canonical point order of the input level."""
        cd = coords.detach().double()
        mins = cd.new_full((num_samples, 3), math.inf).scatter_reduce(
            0, batch[:, None].expand(-1, 3), cd, reduce="amin", include_self=True
        )
        grid = torch.floor((cd - mins[batch]) / self.config.grid_size).long()
        if int(grid.max()) >= _AXIS:
            raise ValueError(
                f"a sample spans more than {_AXIS} voxels of {self.config.grid_size} per axis; raise grid_size"
            )
        voxel_key = (((batch * _AXIS + grid[:, 0]) * _AXIS + grid[:, 1]) * _AXIS) + grid[:, 2]
        perm = _lexsort([voxel_key, *feats.detach().unbind(1), *coords.detach().unbind(1)])
        grid, batch = grid[perm], batch[perm]
        codes = torch.stack([encode(grid, order) for order in self.config.orders])
        return _Level(batch=batch, grid=grid, codes=codes, num_samples=num_samples), perm

    def forward(self, coords: Tensor, feats: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        """Per-point features.

        Args:
            coords: Float[N, 3] positions (scene units).
            feats: Float[N, in_channels] input features.
            batch: Long[N] sample index (None = one sample). Points of different samples never interact.

        Returns:
            Float[N, out_channels] in input order.
        """
        cfg = self.config
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must have shape [N, 3], got {tuple(coords.shape)}")
        if feats.ndim != 2 or feats.shape != (coords.shape[0], cfg.in_channels):
            raise ValueError(f"feats must have shape [{coords.shape[0]}, {cfg.in_channels}], got {tuple(feats.shape)}")
        n = coords.shape[0]
        if n == 0:
            return feats.new_zeros(0, cfg.out_channels)
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=coords.device)
        if batch.shape != (n,) or batch.dtype.is_floating_point or int(batch.min()) < 0:
            raise ValueError("batch must be a non-negative integer tensor of shape [N]")
        batch = batch.long()
        level, perm = self._level0(coords, feats, batch, int(batch.max()) + 1)

        num_orders = len(cfg.orders)
        if self.training and cfg.shuffle_orders:
            schedule = torch.randperm(num_orders).tolist()
        else:
            schedule = list(range(num_orders))
        block_idx = itertools.count()

        x = self.embedding(feats.index_select(0, perm))
        levels, skips = [level], []
        for s, blocks in enumerate(self.enc):
            if s > 0:
                levels.append(_pool_level(levels[-1]))
                x = _segment_max(self.pools[s - 1][0](x), levels[-1].parent, levels[-1].batch.numel())
                x = self.pools[s - 1][2](self.pools[s - 1][1](x))
            for block in blocks:
                x = block(x, levels[s], schedule[next(block_idx) % num_orders])
            skips.append(x)
        for s in reversed(range(len(self.dec))):
            x = self.unpool_proj[s](x).index_select(0, levels[s + 1].parent) + self.unpool_skip[s](skips[s])
            for block in self.dec[s]:
                x = block(x, levels[s], schedule[next(block_idx) % num_orders])
        out = self.head(x)
        return torch.empty_like(out).index_copy_(0, perm, out)
