"""Flow-GRPO SDE rollouts of RL3DEdit: formulas on constructed numbers, the sigma = 1 cap, a = 0 = Euler, the window
schedule, log-prob recomputation and the KL to the LoRA-disabled reference on a tiny non-Flux policy and on the tiny
Kontext."""

from __future__ import annotations

import math
import os
from typing import Tuple

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rl3dedit_scene import smooth_views  # noqa: E402  (tests/ is on sys.path)

from gsstudio_ext.methods.rl3dedit.grid import grid_instruction, resize_image, tile_grid  # noqa: E402
from gsstudio_ext.methods.rl3dedit.sde import (  # noqa: E402
    ReferencePolicy,
    WindowConfig,
    ode_step,
    rollout,
    sde_step,
    step_logprob,
    step_logprob_and_kl,
    transition_kl,
    window_steps,
)
from gsstudio_ext.models.flux_kontext import shifted_sigmas  # noqa: E402
from gsstudio_ext.models.lora import attach_lora, lora_parameters  # noqa: E402

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def kontext():
    from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig

    return TinyFluxKontextConfig().setup().load()


# ======================================================================================================================
# SDE step
# ======================================================================================================================
def test_sde_step_matches_the_formulas_on_constructed_numbers() -> None:
    x, v = torch.ones(1, 2), torch.full((1, 2), 2.0)
    # sigma 0.5 -> 0.25, a = 0.8: std_t = 0.8 sqrt(1) = 0.8; d = -0.25
    # mean = 1 (1 + 0.64 (-0.25) / 1) + 2 (1 + 0.64 0.5 / 1) (-0.25) = 0.84 - 0.66 = 0.18; step std = 0.8 * 0.5 = 0.4
    sample = torch.tensor([[0.58, 0.18]])  # mean + 1 std, mean
    step = sde_step(x, v, 0.5, 0.25, 0.8, sample=sample)
    assert torch.allclose(step.mean, torch.full((1, 2), 0.18), atol=1e-6)
    assert step.std_t.item() == pytest.approx(0.8) and step.step_std.item() == pytest.approx(0.4)
    expected = (-0.5 + 0.0) / 2 - math.log(0.4) - LOG_SQRT_2PI  # the element mean of -z^2/2 over z = (1, 0)
    assert step.log_prob.item() == pytest.approx(expected, abs=1e-6)
    # drawn samples have the stated mean and std
    many = sde_step(torch.ones(4000, 8), torch.full((4000, 8), 2.0), 0.5, 0.25, 0.8, generator=torch.Generator())
    z = (many.sample - 0.18) / 0.4
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert torch.isfinite(many.log_prob).all() and many.log_prob.shape == (4000,)


def test_sigma_one_uses_the_cap_and_zero_noise_is_euler() -> None:
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="sigma_cap"):
        sde_step(x, v, 1.0, 0.9)
    step = sde_step(x, v, 1.0, 0.9, 0.8, sigma_cap=0.9, generator=torch.Generator().manual_seed(0))
    std_t = 0.8 * math.sqrt(1.0 / (1.0 - 0.9))
    assert step.std_t.item() == pytest.approx(std_t, rel=1e-5)
    # at sigma = 1 the (1 - sigma) term of the velocity coefficient vanishes
    assert torch.allclose(step.mean, x * (1 - std_t**2 * 0.1 / 2) - 0.1 * v, atol=1e-5)
    assert torch.isfinite(step.log_prob).all()
    euler = sde_step(x, v, 0.6, 0.45, noise_level=0.0)
    assert torch.allclose(euler.sample, ode_step(x, v, 0.6, 0.45), atol=1e-7)
    assert torch.allclose(euler.sample, x - 0.15 * v, atol=1e-6) and euler.log_prob.abs().sum() == 0
    with pytest.raises(ValueError, match="down"):
        sde_step(x, v, 0.3, 0.5)


def test_kl_closed_form() -> None:
    x, v = torch.zeros(2, 3), torch.zeros(2, 3)
    step = sde_step(x, v, 0.5, 0.25, 0.8, sample=torch.zeros(2, 3))
    ref = step.mean + torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.4, 0.4]])
    kl = transition_kl(step, ref)  # flow_grpo: / (2 std_t^2) = / 1.28
    assert torch.allclose(kl, torch.tensor([0.0, 0.16 / 1.28]), atol=1e-6)
    exact = transition_kl(step, ref, "exact")  # / (2 * 0.4^2) = / 0.32
    assert torch.allclose(exact, torch.tensor([0.0, 0.5]), atol=1e-6)


def test_window_schedules() -> None:
    advance = WindowConfig(size=4, schedule="advance", shift_every=2)
    assert window_steps(advance, 12, iteration=0) == [0, 1, 2, 3]
    assert window_steps(advance, 12, iteration=1) == [0, 1, 2, 3]
    assert window_steps(advance, 12, iteration=2) == [1, 2, 3, 4]
    assert window_steps(advance, 12, iteration=16) == [8, 9, 10, 11]  # the last start (12 - 4)
    assert window_steps(advance, 12, iteration=18) == [0, 1, 2, 3]  # wraps around
    capped = WindowConfig(size=4, shift_every=1, max_start=2)
    assert [window_steps(capped, 12, i)[0] for i in range(5)] == [0, 1, 2, 0, 1]
    rand = WindowConfig(size=4, schedule="random")
    starts = {window_steps(rand, 12, generator=torch.Generator().manual_seed(s))[0] for s in range(60)}
    assert starts == set(range(9))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert window_steps(rand, 12, generator=g1) == window_steps(rand, 12, generator=g2)
    with pytest.raises(ValueError):
        window_steps(WindowConfig(size=13), 12)


# ======================================================================================================================
# rollouts on a tiny non-Flux policy and on the tiny Kontext
# ======================================================================================================================
class ToyPolicy:
    """A per-token MLP velocity field on latents [B, 8, 6] (the sde.Policy protocol), LoRA-ready."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 6))
        self.net.requires_grad_(False)

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        return (8, 6)

    @property
    def module(self) -> nn.Module:
        return self.net

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return shifted_sigmas(num_steps, 1.15)

    def velocity(self, latents: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=latents.dtype).expand(*latents.shape[:-1], 1)
        return self.net(torch.cat([latents, s], dim=-1))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latents[:, None, :3, :]).expand(-1, 3, -1, -1)


def test_rollout_logprobs_recompute_and_kl_on_a_toy_policy() -> None:
    policy = ToyPolicy()
    attach_lora(policy.net, targets=[r"\d"], rank=2, alpha=2)
    reference = ReferencePolicy(policy)
    out = rollout(policy, group_size=4, window=[0, 1, 2, 3], steps=6, generator=torch.Generator().manual_seed(0))
    assert out.latents.shape == (4, 4, 8, 6) and out.next_latents.shape == (4, 4, 8, 6)
    assert out.log_probs.shape == (4, 4) and torch.isfinite(out.log_probs).all()
    assert out.final.shape == (4, 8, 6) and out.images.shape == (4, 3, 3, 6)
    assert out.sigma_cap.item() == pytest.approx(shifted_sigmas(6, 1.15)[1].item())
    assert torch.equal(out.latents[1], out.next_latents[0])  # consecutive window steps chain
    for k in range(4):
        logp, kl = step_logprob_and_kl(policy, reference, out, k)
        assert torch.allclose(logp, out.log_probs[k], atol=1e-6)  # unchanged weights: same log-prob
        assert kl.abs().max() == 0  # LoRA B = 0: the policy is its reference
    # the same noise gives the same rollout (also in micro-batches); a different generator does not
    again = rollout(policy, 4, [0, 1, 2, 3], steps=6, generator=torch.Generator().manual_seed(0), micro_batch=3)
    assert torch.allclose(again.final, out.final, atol=1e-6)
    other = rollout(policy, 4, [0, 1, 2, 3], steps=6, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.final, out.final)
    # after an update the ratio moves, the KL is positive, and gradients reach the LoRA factors only
    params = lora_parameters(policy.net)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.3)
    logp, kl = step_logprob_and_kl(policy, reference, out, 1, rows=slice(0, 2))
    assert logp.shape == (2,) and not torch.allclose(logp, out.log_probs[1, :2], atol=1e-4)
    assert (kl > 0).all()
    (logp.sum() + kl.sum()).backward()
    assert all(p.grad is not None for p in params) and policy.net[0].base.weight.grad is None


def test_ode_only_rollout_equals_edit_and_kontext_logprobs(kontext) -> None:
    grid = resize_image(tile_grid(smooth_views(8, 8)), (32, 32))
    prompt = grid_instruction("make the cat red")
    policy = kontext.policy(kontext.encode_image(grid[None]), kontext.encode_prompt(prompt))
    assert policy.latent_shape == (64, 64)
    noise = kontext.initial_noise((32, 32), 1, torch.Generator("cpu").manual_seed(11))
    ode = rollout(policy, 1, window=[], steps=3, noise=noise)
    assert ode.log_probs.shape == (0, 1)
    assert torch.allclose(ode.images[0], kontext.edit(grid, prompt, steps=3, seed=11), atol=1e-5)
    sde = rollout(policy, 2, window=[0, 1], steps=3, generator=torch.Generator().manual_seed(0))
    assert sde.images.shape == (2, 3, 32, 32) and torch.isfinite(sde.log_probs).all()
    for k in range(2):
        assert torch.allclose(step_logprob(policy, sde, k).log_prob, sde.log_probs[k], atol=1e-5)
