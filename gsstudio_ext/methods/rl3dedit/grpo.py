"""GRPO training of the multi-view editor (editing-methods.md §3.4, §3.6): grouped SDE rollouts on a MixGRPO window,
group-normalised advantages from a reward, the clipped policy loss plus a KL to the reference (the same network with
its LoRA disabled), AdamW on the trainable (LoRA) parameters.

One :meth:`GRPOTrainer.step` is one sample: G rollouts of the policy for that sample's condition, their rewards, and
one optimiser update. Under ``torch.distributed`` every rank runs its own samples and the gradients are averaged
before the update (data parallel, as Flow-GRPO); the rollouts of a group stay on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gsstudio_ext.methods.rl3dedit.grpo_loss import GRPOLossConfig, group_advantages, grpo_step_loss
from gsstudio_ext.methods.rl3dedit.sde import (
    Policy,
    ReferencePolicy,
    Rollout,
    WindowConfig,
    rollout,
    step_logprob_and_kl,
    window_steps,
)
from gsstudio_ext.models.lora import lora_parameters

RewardFn = Callable[[Rollout], Tensor]
"""``reward(rollout)`` -> Float[G], one scalar reward per trajectory of the group (from ``rollout.images``)."""


@dataclass
class GRPOConfig:
    """Rollouts and optimiser of the editor's RL fine-tuning. [P] = paper, [I] = our choice (unpublished)."""

    group_size: int = 16
    """Rollouts per sample, G [P]."""
    steps: int = 12
    """Denoising steps per rollout [P: 6 was worse, 20 no better]."""
    noise_level: float = 0.8
    """SDE noise level a [P]."""
    window: WindowConfig = field(default_factory=WindowConfig)
    """MixGRPO window: only these steps are stochastic and trained [P: size 4; schedule I]."""
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    """Clip range, KL weight, advantage clip [I: Flow-GRPO defaults]."""
    lr: float = 3e-4
    """AdamW learning rate of the LoRA factors [I: Flow-GRPO]."""
    weight_decay: float = 1e-4
    """AdamW weight decay [I: Flow-GRPO]."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip before each update [I: Flow-GRPO]."""
    kl_std: Literal["flow_grpo", "exact"] = "flow_grpo"
    """Divisor of the closed-form KL (see :func:`sde.transition_kl`)."""
    micro_batch: Optional[int] = None
    """At most this many trajectories per network call, in rollouts and in the loss pass (memory); None = the whole
    group."""
    seed: int = 0
    """Seed of the rollout noise (per rank: seed + rank)."""


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GRPOTrainer:
    """Fine-tunes ``params`` (default: the LoRA factors of ``module``) with GRPO; see the module docstring."""

    def __init__(self, module: nn.Module, config: Optional[GRPOConfig] = None, params: Optional[List] = None) -> None:
        self.config = config or GRPOConfig()
        self.module = module
        self.params = list(params) if params is not None else lora_parameters(module)
        if not self.params:
            raise ValueError("nothing to train: attach LoRA to the policy's module first (models.lora.attach_lora)")
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        rank, _ = _world()
        self.generator = torch.Generator().manual_seed(int(self.config.seed) + rank)
        self.iteration = 0

    def step(self, policy: Policy, reward: RewardFn) -> Dict[str, float]:
        """One GRPO iteration on one sample: ``policy`` is the editor bound to the sample's condition (it must run
        through ``self.module``); returns the group's reward statistics and the loss terms."""
        cfg = self.config
        window = window_steps(cfg.window, cfg.steps, self.iteration, self.generator)
        with torch.no_grad():
            group = rollout(policy, cfg.group_size, window, cfg.steps, cfg.noise_level, self.generator, cfg.micro_batch)
            rewards = reward(group).detach().float().flatten().cpu()
        if rewards.shape[0] != cfg.group_size:
            raise ValueError(f"the reward gave {rewards.shape[0]} values for a group of {cfg.group_size}")
        advantages = group_advantages(rewards, cfg.loss).to(group.log_probs.device)
        reference = ReferencePolicy(policy)
        self.optimizer.zero_grad(set_to_none=True)
        total, kls = 0.0, []
        chunk = cfg.micro_batch or cfg.group_size
        for k in range(len(window)):
            for start in range(0, cfg.group_size, chunk):  # means over the group = size-weighted chunk means
                rows = slice(start, min(start + chunk, cfg.group_size))
                weight = (rows.stop - rows.start) / cfg.group_size / len(window)
                logp, kl = step_logprob_and_kl(policy, reference, group, k, rows, kl_std=cfg.kl_std)
                loss = grpo_step_loss(logp, group.log_probs[k][rows], advantages[rows], kl, cfg.loss) * weight
                loss.backward()  # per window step and chunk: one small graph alive at a time
                total += float(loss.detach())
                kls.append(float(kl.detach().mean()) * (rows.stop - rows.start) / cfg.group_size)
        self._average_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.iteration += 1
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(correction=0)),
            "loss": total,
            "kl": sum(kls) / max(len(window), 1),
            "grad_norm": float(grad_norm),
        }

    def _average_gradients(self) -> None:
        """Data parallel: the mean of every rank's gradients (a rank without a gradient contributes zeros)."""
        _, world = _world()
        if world == 1:
            return
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            p.grad = grad / world
