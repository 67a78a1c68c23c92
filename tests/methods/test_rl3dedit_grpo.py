"""RL3DEdit GRPO: advantages, the clipped policy loss and its gradients on constructed numbers; the trainer raises
the offline verifier's reward of a tiny multi-view editor (the issue's acceptance), across 3 seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsstudio_ext.methods.rl3dedit.grid import split_grid, tile_grid
from gsstudio_ext.methods.rl3dedit.grpo import GRPOConfig, GRPOTrainer
from gsstudio_ext.methods.rl3dedit.grpo_loss import (
    GRPOLossConfig,
    clipped_policy_loss,
    group_advantages,
    grpo_step_loss,
)
from gsstudio_ext.methods.rl3dedit.rewards import ReprojectionVerifierConfig, RewardConfig, RewardModel
from gsstudio_ext.methods.rl3dedit.sde import WindowConfig, rollout
from gsstudio_ext.models.lora import attach_lora
from gsstudio_ext.models.perceptual import TinyPerceptualConfig


def test_group_advantages_are_normalised_per_group_and_clipped():
    config = GRPOLossConfig(std_eps=0.0, advantage_clip=5.0)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), config)
    assert adv.mean().abs() < 1e-6 and (adv.std(correction=0) - 1).abs() < 1e-6
    assert adv.argsort().tolist() == [0, 1, 2, 3]
    rows = group_advantages(torch.tensor([[0.0, 1.0], [5.0, 5.0]]), GRPOLossConfig())
    assert torch.allclose(rows[0], torch.tensor([-1.0, 1.0]), atol=1e-3) and rows[1].abs().max() == 0
    outlier = group_advantages(torch.tensor([0.0] * 99 + [1.0]), config)
    assert outlier.max() == 5.0  # 9.95 before clipping
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0]), config)


def test_clipped_loss_value_and_gradient():
    adv = torch.tensor([1.0, -1.0])
    logp_old = torch.zeros(2)
    logp = torch.zeros(2, requires_grad=True)
    loss = clipped_policy_loss(logp, logp_old, adv, clip_range=0.2)
    assert loss.item() == 0.0  # rho = 1: -mean(A) = 0
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([-0.5, 0.5]))  # raise the good rollout, lower the bad one
    # outside the clip range in the advantage's direction the gradient vanishes; against it, it stays
    logp = torch.tensor([0.5, 0.5], requires_grad=True)
    clipped_policy_loss(logp, logp_old, adv, clip_range=0.2).backward()
    assert logp.grad[0] == 0 and logp.grad[1] > 0


def test_kl_term_is_added_with_beta():
    config = GRPOLossConfig(clip_range=0.2, kl_beta=0.5)
    zeros = torch.zeros(3)
    loss = grpo_step_loss(zeros, zeros, torch.tensor([1.0, 0.0, -1.0]), torch.tensor([1.0, 2.0, 3.0]), config)
    assert loss.item() == pytest.approx(1.0)  # policy term 0 + 0.5 x mean KL 2


# ================================================================================ acceptance: GRPO raises the reward
class ResidualEditPolicy:
    """A tiny editor for the 9 ring views: latents [9, 3, 8, 8] -> a colour residual 0.1 tanh(.) upsampled onto each
    source view, returned as the 3x3 grid the Kontext editor would produce. Its velocity is a per-element MLP of
    (x, sigma) with LoRA; random at start, so every rollout paints independent noise into each view (inconsistent)."""

    def __init__(self, sources: torch.Tensor, seed: int) -> None:
        torch.manual_seed(seed)
        self.sources = sources
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.net.requires_grad_(False)

    latent_shape = (9, 3, 8, 8)

    @property
    def module(self) -> torch.nn.Module:
        return self.net

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def velocity(self, latents: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=latents.dtype).expand_as(latents)
        return self.net(torch.stack([latents, s], dim=-1))[..., 0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        size = self.sources.shape[-1]
        residual = 0.1 * torch.tanh(F.interpolate(latents.flatten(0, 1), size=size, mode="bilinear"))
        views = (self.sources + residual.view(latents.shape[0], 9, 3, size, size)).clamp(0, 1)
        return torch.stack([tile_grid(v) for v in views])


@pytest.fixture(scope="module")
def ring():
    from rl3dedit_scene import ring_views  # tests/ is on sys.path (conftest's folder)

    return ring_views(9, 64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_raises_the_offline_verifier_reward(ring, seed: int):
    rewards = RewardModel(RewardConfig(verifier=ReprojectionVerifierConfig(), perceptual=TinyPerceptualConfig()))
    reference = rewards.reference(ring)
    policy = ResidualEditPolicy(ring.images, seed)
    attach_lora(policy.net, targets=[r"\d"], rank=4, alpha=4)
    config = GRPOConfig(group_size=16, steps=6, lr=3e-2, window=WindowConfig(size=4, schedule="random"), seed=seed)
    config.loss.kl_beta = 0.0
    trainer = GRPOTrainer(policy.net, config)
    gen = torch.Generator().manual_seed(100 + seed)

    def reward(group) -> torch.Tensor:
        anchor = int(torch.randint(0, 9, (1,), generator=gen))  # one random anchor per group [P]
        edited = split_grid(group.images)
        return rewards(edited, anchor, ring.images[anchor], ring, reference)["reward"]

    def evaluate() -> float:  # deterministic (ODE) edits of fixed noise
        noise = torch.randn((16, *policy.latent_shape), generator=torch.Generator().manual_seed(7))
        group = rollout(policy, 16, [], steps=6, noise=noise)
        return float(rewards(split_grid(group.images), 4, ring.images[4], ring, reference)["reward"].mean())

    before = evaluate()
    stats = [trainer.step(policy, reward) for _ in range(20)]
    after = evaluate()
    print(f"seed {seed}: reward {before:.3f} -> {after:.3f}; group means {[round(s['reward_mean'], 3) for s in stats]}")
    assert after > before + 0.1


def test_micro_batches_give_the_same_update_as_the_whole_group(ring):
    updated = []
    for micro_batch in (None, 3):
        policy = ResidualEditPolicy(ring.images, seed=5)
        attach_lora(policy.net, targets=[r"\d"], rank=4, alpha=4)
        config = GRPOConfig(group_size=8, steps=4, lr=1e-2, window=WindowConfig(size=2), micro_batch=micro_batch)
        trainer = GRPOTrainer(policy.net, config)
        stats = trainer.step(policy, lambda group: group.images.mean(dim=(1, 2, 3)))
        updated.append((torch.cat([p.detach().flatten() for p in trainer.params]), stats))
    (whole, a), (chunked, b) = updated
    assert torch.allclose(whole, chunked, atol=1e-6) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)
