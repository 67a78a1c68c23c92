"""ReferSplat's contrastive term and schedule against direct formulas."""

import math

import pytest
import torch

from gsstudio_ext.methods.referspat.losses import gtcl_loss, rho_at, sentence_embeddings


def test_rho_schedule() -> None:
    assert rho_at(0) == 0.1 and rho_at(1999) == 0.1
    assert rho_at(2000) == pytest.approx(0.06) and rho_at(4000) == pytest.approx(0.036)
    assert rho_at(100_000) == 0.005


def test_sentence_embeddings_ignore_padding() -> None:
    words = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    assert torch.equal(sentence_embeddings(words, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 1.0]]))


def test_gtcl_matches_the_double_sum_and_rewards_the_right_sentence() -> None:
    gen = torch.Generator().manual_seed(0)
    S, N, d = 4, 20, 8
    gaussians = torch.randn(S, N, d, generator=gen)
    responses = torch.randn(N, S, generator=gen)
    sentences = torch.randn(S, d, generator=gen)
    categories = torch.tensor([0, 0, 1, 2])
    rho = 0.25
    loss = gtcl_loss(gaussians, responses, sentences, categories, rho)
    for k in range(S):
        top = responses[:, k].topk(5).indices
        e = gaussians[k, top].mean(0)
        z = torch.nn.functional.cosine_similarity(e[None], sentences) / 0.1
        pos = [j for j in range(S) if categories[j] == categories[k]]
        neg = [j for j in range(S) if j not in pos]
        direct = math.log(1 + sum(math.exp(z[n] - z[p]) for p in pos for n in neg))
        assert loss[k].item() == pytest.approx(direct, rel=1e-5)
    # Pooled Gaussians that look like their own sentence give a lower loss than ones that look like another.
    aligned = sentences[:, None, :].expand(S, N, d).clone()
    wrong = sentences[[3, 3, 0, 0]][:, None, :].expand(S, N, d).clone()
    assert (gtcl_loss(aligned, responses, sentences, categories, rho) < gtcl_loss(wrong, responses, sentences,
            categories, rho)).all()  # fmt: skip
    # One category only: no negative, no loss.
    assert torch.equal(gtcl_loss(gaussians, responses, sentences, torch.zeros(S), rho), torch.zeros(S))
