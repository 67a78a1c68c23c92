"""ReferSplat's training terms (segmentation-methods.md §3.4), batched over the S sentences of a view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rho_at(step: int, start: float = 0.1, factor: float = 0.6, every: int = 2000, floor: float = 0.005) -> float:
    """Fraction of Gaussians pooled by the contrastive term: ``start * factor ** (step // every)``, at least
    ``floor`` (0.1, x0.6 every 2000 steps, floor 0.005)."""
    return max(start * factor ** (step // every), floor)


def sentence_embeddings(words: Tensor, word_mask: Tensor) -> Tensor:
    """Mean of each sentence's real words [S, L, d] -> [S, d] (the official batch call also averages padding)."""
    weight = word_mask.to(words.dtype)[..., None]
    return (words * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


def gtcl_loss(
    gaussians: Tensor, responses: Tensor, sentences: Tensor, categories: Tensor, rho: float, temperature: float = 0.1
) -> Tensor:
    """Gaussian-text contrastive loss per sentence [S].

    For sentence k: e_k = mean of G'_k over its top floor(rho N) Gaussians by response; z_kj = cos(e_k, u_j) / T;
    positives P_k = sentences of the same category (k included); L_k = log(1 + sum_{p in P_k} sum_{n not in P_k}
    exp(z_kn - z_kp)), computed as softplus(logsumexp_n z_kn + logsumexp_p -z_kp). No negative: L_k = 0.

    Args:
        gaussians: [S, N, d] attended Gaussian embeddings G'.
        responses: [N, S] per-Gaussian responses.
        sentences: [S, d] sentence embeddings u.
        categories: [S] category (object) id of each sentence.
        rho: fraction of Gaussians pooled.
        temperature: T (0.1).
    """
    num = gaussians.shape[1]
    count = max(1, int(rho * num))
    top = responses.T.topk(count, dim=1).indices  # [S, count]
    pooled = torch.gather(gaussians, 1, top[..., None].expand(-1, -1, gaussians.shape[2])).mean(dim=1)
    z = F.normalize(pooled, dim=-1) @ F.normalize(sentences, dim=-1).T / temperature  # [S, S]
    positive = categories[:, None] == categories[None, :]
    neg_lse = torch.logsumexp(z.masked_fill(positive, float("-inf")), dim=1)
    pos_lse = torch.logsumexp((-z).masked_fill(~positive, float("-inf")), dim=1)
    has_negative = (~positive).any(dim=1)
    return torch.where(has_negative, F.softplus(neg_lse + pos_lse), torch.zeros_like(neg_lse))
