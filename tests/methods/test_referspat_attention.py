"""ReferSplat's PCMI cross-attention, batched over sentences."""

import torch

from gsstudio_ext.methods.referspat.attention import PCMI, PCMIConfig


def _inputs(n: int = 50, s: int = 3, length: int = 6, word_dim: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 16, generator=gen)
    xyz = torch.randn(n, 3, generator=gen)
    words = torch.randn(s, length, word_dim, generator=gen)
    mask = torch.ones(s, length, dtype=torch.bool)
    mask[1, 4:] = False  # a shorter sentence, padded
    return features, xyz, words, mask


def _model(word_dim: int = 24) -> PCMI:
    torch.manual_seed(0)
    return PCMI(PCMIConfig(word_dim=word_dim)).eval()


def test_batched_sentences_equal_one_sentence_at_a_time_and_padding_changes_nothing() -> None:
    model = _model()
    features, xyz, words, mask = _inputs()
    batched = model(features, xyz, words, mask)
    assert batched.responses.shape == (50, 3) and batched.gaussians.shape == (3, 50, 128)
    for k in range(3):
        length = int(mask[k].sum())
        alone = model(features, xyz, words[k : k + 1, :length], mask[k : k + 1, :length])
        torch.testing.assert_close(alone.responses[:, 0], batched.responses[:, k], rtol=1e-5, atol=1e-5)
    # Changing a padded word's embedding does not change anything.
    words2 = words.clone()
    words2[1, 5] = 100.0
    torch.testing.assert_close(model(features, xyz, words2, mask).responses, batched.responses)


def test_gaussians_are_permutation_equivariant_and_a_wordless_sentence_responds_zero() -> None:
    model = _model()
    features, xyz, words, mask = _inputs()
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    out = model(features, xyz, words, mask).responses
    torch.testing.assert_close(model(features[perm], xyz[perm], words, mask).responses, out[perm])
    mask[2] = False
    empty = model(features, xyz, words, mask).responses
    assert torch.isfinite(empty).all() and torch.equal(empty[:, 2], torch.zeros(50))


def test_position_and_referring_features_both_shape_the_response_and_receive_gradients() -> None:
    model = _model()
    features, xyz, words, mask = _inputs()
    features.requires_grad_(True)
    out = model(features, xyz, words, mask).responses
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    moved = model(features.detach(), xyz + 1.0, words, mask).responses
    assert (moved - out.detach()).abs().max() > 1e-4  # the position branch matters


def test_restricting_the_word_placement_equals_attending_over_the_subset_only() -> None:
    """attend(..., among=mask) gives the masked Gaussians the responses they get when only they are given."""
    features, xyz, words, mask = _inputs(n=60)
    model = _model()
    with torch.no_grad():  # make the word positions matter (random weights barely use them)
        model.kp.weight.mul_(100.0)
        model.text_mlp[-1].weight.mul_(10.0)
    among = torch.rand(60, generator=torch.Generator().manual_seed(3)) > 0.4
    with torch.no_grad():
        subset = model(features[among], xyz[among], words, mask).responses
        masked = model.attend(model.gaussian_terms(features, xyz), words, mask, among=among).responses
    # responses reach ~20, so float32 sums in another order differ by more than 1e-5
    assert torch.allclose(masked[among], subset, rtol=1e-5, atol=1e-4)
    full = model(features, xyz, words, mask).responses.detach()
    assert float((masked - full).abs().max()) > 1e-2  # the placement did change
