"""GRPO objective pieces (editing-methods.md §3.6, Flow-GRPO): group-normalised advantages and the clipped policy
loss with a KL penalty to the reference policy.

For one window step of G rollouts: ``rho = exp(logp_theta - logp_old)``,
``L = -mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)) + beta * KL``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GRPOLossConfig:
    """Values the paper leaves open, taken from Flow-GRPO's defaults [I]."""

    clip_range: float = 1e-4
    """PPO ratio clip epsilon [I: Flow-GRPO default]."""
    kl_beta: float = 0.04
    """Weight of the KL to the reference (LoRA disabled) [I: Flow-GRPO GenEval/OCR; 0.01 for PickScore]."""
    advantage_clip: float = 5.0
    """Advantages are clipped to +-this [I: Flow-GRPO default]."""
    std_eps: float = 1e-4
    """Added to the group's reward std before dividing [I]."""


def group_advantages(rewards: Tensor, config: GRPOLossConfig) -> Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps), clipped to +-advantage_clip; rewards Float[G] of one group (or
    Float[B, G] for B groups, normalised per row). A group whose rewards are all equal gets zero advantages."""
    if rewards.ndim not in (1, 2) or rewards.shape[-1] < 2:
        raise ValueError(f"need rewards [G] or [B, G] with G >= 2, got {list(rewards.shape)}")
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, correction=0)
    adv = (rewards - mean) / (std + config.std_eps)
    return adv.clamp(-config.advantage_clip, config.advantage_clip)


def clipped_policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)) with rho = exp(logp - logp_old); all Float[G]."""
    ratio = torch.exp(logp - logp_old.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages
    return -torch.minimum(unclipped, clipped).mean()


def grpo_step_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, kl: Tensor, config: GRPOLossConfig) -> Tensor:
    """The loss of one window step: the clipped policy loss plus ``kl_beta`` x mean KL (kl Float[G])."""
    return clipped_policy_loss(logp, logp_old, advantages, config.clip_range) + config.kl_beta * kl.mean()
