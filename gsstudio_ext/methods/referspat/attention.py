"""ReferSplat's position-aware cross-modal interaction (PCMI, segmentation-methods.md §3.3), batched over sentences.

For N Gaussians with referring features r [N, 16] at positions xyz [N, 3], and S sentences of at most L words
(word embeddings [S, L, Dw] from the text encoder, padding marked by ``word_mask``):

- W = MLP1(words) [S, L, d]; G = MLP2(r) [N, d]; P = normalize(MLP3(xyz)) [N, d];
- language-induced word positions P_t = softmax_N(W G^T) P [S, L, d] (softmax over the given Gaussians);
- Q = q(G) + gp(P); K = k(W) + kp(P_t); V = v(W);
- G' = LayerNorm(softmax_L(Q K^T / sqrt(d)) V + G) [S, N, d], padded words masked out;
- response s = sum over the sentence's words of <G'_i, W_l>, returned as [N, S]: one column per sentence, so all
  sentences of a view are splatted as S colour channels in ONE rasterization.

The official code runs one sentence at a time; every sentence here shares G, P and Q. Restricting the Gaussians to
those visible in the view (the caller passes that subset) is the spec's §3.8 variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class PCMIConfig:
    """Sizes of ReferSplat's text, Gaussian and position MLPs and of its one-head cross-attention."""

    word_dim: int = 1024
    """Width of the text encoder's word embeddings (BERT-large 1024; the offline MiniLM 384)."""
    feature_dim: int = 16
    """Width of the learnable per-Gaussian referring feature."""
    dim: int = 128
    """Attention width d."""
    text_hidden: tuple = (512, 256)
    """Hidden widths of MLP1 (words)."""
    gaussian_hidden: tuple = (32, 64)
    """Hidden widths of MLP2 (referring features)."""
    position_hidden: tuple = (16, 64)
    """Hidden widths of MLP3 (positions)."""


class PCMIOutput(NamedTuple):
    responses: Tensor
    """[N, S] per-Gaussian response to each sentence (the logit that is splatted)."""
    gaussians: Tensor
    """[S, N, d] attended Gaussian embeddings G' (pooled over the top responses for the contrastive term)."""
    words: Tensor
    """[S, L, d] word embeddings W after MLP1."""


class PCMI(nn.Module):
    """Position-aware cross-attention between Gaussians and the words of S sentences at once."""

    def __init__(self, config: PCMIConfig) -> None:
        super().__init__()
        d = config.dim
        self.config = config
        self.text_mlp = mlp((config.word_dim, *config.text_hidden, d))
        self.gaussian_mlp = mlp((config.feature_dim, *config.gaussian_hidden, d))
        self.position_mlp = mlp((3, *config.position_hidden, d))
        self.q, self.k, self.v, self.gp, self.kp = (nn.Linear(d, d) for _ in range(5))
        self.norm = nn.LayerNorm(d)

    def encode_words(self, words: Tensor) -> Tensor:
        """W = MLP1(words): [S, L, Dw] -> [S, L, d]."""
        return self.text_mlp(words)

    def gaussian_terms(self, features: Tensor, xyz: Tensor) -> "GaussianTerms":
        """The word-independent part: G = MLP2(r), P = normalize(MLP3(xyz)), Q = q(G) + gp(P), each [N, d]
        (cacheable between queries while the weights do not change)."""
        G = self.gaussian_mlp(features)
        P = F.normalize(self.position_mlp(xyz), dim=-1)
        return GaussianTerms(G, P, self.q(G) + self.gp(P))

    def forward(self, features: Tensor, xyz: Tensor, words: Tensor, word_mask: Tensor) -> PCMIOutput:
        """Responses of N Gaussians (features [N, F], xyz [N, 3]) to S sentences (words [S, L, Dw], word_mask
        [S, L] bool, True for real words). A sentence without words gets response 0 everywhere."""
        return self.attend(self.gaussian_terms(features, xyz), words, word_mask)

    def attend(
        self, terms: "GaussianTerms", words: Tensor, word_mask: Tensor, among: Optional[Tensor] = None
    ) -> PCMIOutput:
        """:meth:`forward` from precomputed Gaussian terms. ``among`` (bool [N]) restricts the softmax over
        Gaussians that places the words to those Gaussians, as if only they had been given (every Gaussian's own
        attention does not depend on the others)."""
        if words.dim() != 3 or word_mask.shape != words.shape[:2]:
            raise ValueError(f"words must be [S, L, D] with word_mask [S, L]; got {tuple(words.shape)}, "
                             f"{tuple(word_mask.shape)}")  # fmt: skip
        G, P, Q = terms
        W = self.encode_words(words)  # [S, L, d]
        placement = W @ G.T  # [S, L, N]
        if among is not None:
            placement = placement.masked_fill(~among, float("-inf"))
        word_positions = torch.softmax(placement, dim=-1) @ P  # [S, L, d], softmax over Gaussians
        K = self.k(W) + self.kp(word_positions)  # [S, L, d]
        scores = torch.einsum("nd,sld->snl", Q, K) / math.sqrt(self.config.dim)
        scores = scores.masked_fill(~word_mask[:, None, :], float("-inf"))
        attention = torch.nan_to_num(torch.softmax(scores, dim=-1))  # a wordless sentence attends to nothing
        attended = self.norm(attention @ self.v(W) + G)  # [S, N, d]
        responses = torch.einsum("snd,sld->sn", attended, W * word_mask[..., None].to(W.dtype))
        return PCMIOutput(responses.T, attended, W)


class GaussianTerms(NamedTuple):
    G: Tensor
    """[N, d] MLP2 of the referring features."""
    P: Tensor
    """[N, d] normalised MLP3 of the positions."""
    Q: Tensor
    """[N, d] attention queries."""
