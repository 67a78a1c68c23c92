"""Capturing SD3 joint attention: the pre-softmax logits of chosen text-query rows against the image keys.

:meth:`RectifiedFlowModel.capture_attention` installs :class:`JointAttentionCaptureProcessor` on every joint block;
it computes the same output as diffusers' default processor and, for the recording blocks, adds head-averaged
logits to an :class:`AttentionStore` without forming the full attention matrix.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


# ======================================================================================================================
class AttentionStore:
    """Pre-softmax text-query x image-key logits, averaged over heads and summed over the chosen blocks.

    The provider resets it at the start of every transformer forward, so after a sequence of forwards it holds the
    last one only (as RoMaP's code does).
    """

    def __init__(self, rows: Sequence[int], blocks: Set[int]) -> None:
        self.rows = [int(r) for r in rows]
        self.blocks = set(blocks)
        self.grid: Tuple[int, int] = (0, 0)
        self.blocks_seen: List[int] = []
        self._sum: Optional[Tensor] = None

    def reset(self, grid: Tuple[int, int]) -> None:
        self.grid, self.blocks_seen, self._sum = grid, [], None

    def add(self, block: int, logits: Tensor) -> None:
        """logits: Float[B, R, N_img] of one block."""
        logits = logits.detach().float()
        self._sum = logits if self._sum is None else self._sum + logits
        self.blocks_seen.append(block)

    @property
    def batch_maps(self) -> Tensor:
        """Float[B, R, h_tokens, w_tokens] of the last forward."""
        if self._sum is None:
            raise RuntimeError("no attention captured: run a forward (velocity) inside capture_attention")
        return self._sum.reshape(self._sum.shape[0], self._sum.shape[1], *self.grid)

    @property
    def maps(self) -> Tensor:
        """Float[R, h_tokens, w_tokens] of the first batch item."""
        return self.batch_maps[0]


class JointAttentionCaptureProcessor:
    """SD3 joint-attention processor: same output as diffusers' default; with a store, it also records the logits
    of ``store.rows`` (text-sequence query rows) against the image keys, without forming the full attention."""

    def __init__(self, block: int, store: Optional[AttentionStore] = None) -> None:
        self.block = block
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        batch = hidden_states.shape[0]

        def split(x: Tensor) -> Tensor:  # [B, L, H*d] -> [B, H, L, d]
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        n_img = q.shape[2]
        ctx = encoder_hidden_states
        if ctx is not None:
            cq, ck, cv = split(attn.add_q_proj(ctx)), split(attn.add_k_proj(ctx)), split(attn.add_v_proj(ctx))
            if getattr(attn, "norm_added_q", None) is not None:
                cq = attn.norm_added_q(cq)
            if getattr(attn, "norm_added_k", None) is not None:
                ck = attn.norm_added_k(ck)
            if self.store is not None and self.store.rows:
                with torch.no_grad():
                    rows = cq[:, :, self.store.rows]  # [B, H, R, d]
                    logits = rows @ k.transpose(-1, -2) * rows.shape[-1] ** -0.5  # [B, H, R, N_img]
                    self.store.add(self.block, logits.mean(dim=1))
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        if ctx is not None:
            out, ctx_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx_out = attn.to_add_out(ctx_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx_out) if ctx is not None else out
