"""Raw per-part attention maps of a rendered view from SD3's joint attention (RoMaP 3D-GALP, spec §2.3 steps 1-4).

The view is encoded, noised with the controlled forward ODE under a segmentation prompt ("<base> with <part 1> and
<part 2> ..."), and during the last inversion forward the pre-softmax logits of each part's word tokens (queries)
against the image tokens (keys) are read, averaged over heads and the part's tokens, and summed over blocks
0 .. n-2. Post-processing (upsampling, softmax temperature, refinement, exclusivity) is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gsstudio_ext.methods.romap.rf_inversion import controlled_forward_ode, inversion_timesteps
from gsstudio_ext.models.rectified_flow import RectifiedFlowModel


class PartWords(NamedTuple):
    """One part's words and the character where its clause starts in the segmentation prompt."""

    words: Tuple[str, ...]
    start: int


@dataclass
class PartAttentionConfig:
    """Settings of the attention read-out (values from RoMaP's code unless marked [I])."""

    num_timesteps: int = 5
    """Inversion sigmas (4 model forwards); the last forward (sigma ~0.69 with SD3) is the one read."""
    lo: float = 0.30
    """Least-noisy end of the index range, as a fraction of the 1000-entry schedule (index 0 = sigma 1)."""
    hi: float = 0.98
    """Most-noisy end of the index range (see ``lo``)."""
    gamma: float = 0.5
    """Controller strength of the forward ODE."""
    blocks: Optional[Tuple[int, ...]] = None
    """Joint blocks summed; None = all but the last (0..22 of SD3's 24)."""


def segmentation_prompt(base_prompt: str, seg_list: Sequence[Sequence[str]]) -> Tuple[str, List[PartWords]]:
    """``"A photo of woman"`` + ``[["lips"], ["hair"]]`` -> ``"A photo of woman with lips and hair"`` and each
    part's words with the start of its clause (so a word also present in the base prompt is not picked)."""
    if not seg_list:
        raise ValueError("seg_list must name at least one part")
    text = base_prompt.strip().rstrip(".")
    groups: List[PartWords] = []
    for j, words in enumerate(seg_list):
        words = tuple(w.strip() for w in ([words] if isinstance(words, str) else words) if w.strip())
        if not words:
            raise ValueError(f"part {j} of seg_list has no words")
        text += " with " if j == 0 else " and "
        groups.append(PartWords(words, len(text)))
        text += " ".join(words)
    return text, groups


def part_attention_maps(
    model: RectifiedFlowModel,
    image: Tensor,
    base_prompt: str,
    seg_list: Sequence[Sequence[str]],
    config: Optional[PartAttentionConfig] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Raw attention logit maps Float[P, h, w], one per part of ``seg_list``, on the transformer token grid
    (h = H / (vae factor * patch): 32 x 32 for SD3 at 512 x 512). ``image``: Float[3, H, W] RGB in [0, 1]."""
    config = config or PartAttentionConfig()
    prompt, groups = segmentation_prompt(base_prompt, seg_list)
    part_rows = [model.word_token_positions(prompt, g.words, start=g.start) for g in groups]
    rows = sorted({r for pr in part_rows for r in pr})
    blocks = config.blocks if config.blocks is not None else tuple(range(model.num_blocks - 1))
    if not blocks:
        raise ValueError("no attention blocks selected (a one-block transformer has none but the last)")
    with torch.no_grad():
        z = model.encode_image(image[None].to(model.device))
        embeds = model.encode_prompt([prompt])
        sigmas = inversion_timesteps(model, config.num_timesteps, config.lo, config.hi)
        with model.capture_attention(rows, blocks) as store:
            controlled_forward_ode(model, z, embeds, sigmas, config.gamma, generator=generator)
        maps = store.maps  # [R, h, w] of the last forward, summed over blocks
    index = {r: i for i, r in enumerate(rows)}
    return torch.stack([maps[[index[r] for r in pr]].mean(dim=0) for pr in part_rows])
