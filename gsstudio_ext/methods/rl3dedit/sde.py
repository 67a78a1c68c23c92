"""Flow-GRPO SDE rollouts with log-probabilities and the MixGRPO sliding window (spec §3.4, §3.6).

For a flow-matching sigma ``s``, step ``d = s_next - s < 0`` and noise level ``a`` (0.8 [P]):

- ``std_t = a sqrt(s / (1 - s))``;
- ``mean = x (1 + std_t^2 d / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) d``;
- ``x_next = mean + std_t sqrt(-d) eps``;
- ``log p(x_next)`` = Gaussian log-density under ``(mean, std_t sqrt(-d))``, averaged over latent elements [C
  flow_grpo ``sde_step_with_logprob``].

At ``s = 1`` (the first step of a Flux schedule) ``std_t`` is infinite; as Flow-GRPO does, the ``1 - s`` of its
denominator is then replaced by ``1 - s_1`` with ``s_1`` the schedule's second sigma (``sigma_cap``) [C]. With
``a = 0`` the step is the Euler ODE step ``x + v d``.

Only the steps of a window (MixGRPO, size 4 [P]) are stochastic and trained; the others are ODE steps. The window
schedule is unpublished [I]: ``advance`` moves it by ``stride`` every ``shift_every`` iterations and wraps around (as
MixGRPO's progressive window), ``random`` draws a start per sample.

KL to the reference policy (the same network with its LoRA disabled) is the closed form for two Gaussians of equal
std, averaged over elements: ``||mean_theta - mean_ref||^2 / (2 std^2)``. ``kl_std="flow_grpo"`` divides by
``std_t^2`` as Flow-GRPO's code does [C]; ``"exact"`` by the transition variance ``std_t^2 (-d)`` [I].

Latents and the SDE arithmetic are float32; the policy casts to its own dtype. Noise is drawn on the CPU from
``generator`` (reproducible across devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Literal, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from gsstudio_ext.models.lora import lora_disabled

Scalar = Union[float, Tensor]


class Policy(Protocol):
    """A velocity field for one fixed condition (image + instruction), e.g.
    :class:`~gsstudio_ext.models.flux_kontext.KontextPolicy`."""

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        """Shape of one sample's latents (Kontext: (L, 64))."""
        ...

    @property
    def module(self) -> nn.Module:
        """The network carrying the LoRA (for the reference policy)."""
        ...

    def sigmas(self, num_steps: int) -> Tensor:
        """Float[num_steps + 1] sampling sigmas from 1 to 0, on the policy's device."""
        ...

    def velocity(self, latents: Tensor, sigma: Scalar) -> Tensor:
        """Float[B, *latent_shape] at noise level ``sigma`` -> v = eps - x0 of the same shape."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Float[B, *latent_shape] clean latents -> Float[B, 3, H, W] images in [0, 1]."""
        ...


class ReferencePolicy:
    """``policy`` with every LoRA of ``module`` (default ``policy.module``) disabled, without gradients: the KL
    reference."""

    def __init__(self, policy: Policy, module: Optional[nn.Module] = None) -> None:
        self.policy = policy
        self.net = policy.module if module is None else module

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        return self.policy.latent_shape

    @property
    def module(self) -> nn.Module:
        return self.net

    def sigmas(self, num_steps: int) -> Tensor:
        return self.policy.sigmas(num_steps)

    def velocity(self, latents: Tensor, sigma: Scalar) -> Tensor:
        with torch.no_grad(), lora_disabled(self.net):
            return self.policy.velocity(latents, sigma)

    def decode(self, latents: Tensor) -> Tensor:
        return self.policy.decode(latents)


# ======================================================================================================================
# one step
# ======================================================================================================================
@dataclass
class SDEStep:
    """One SDE transition ``x -> sample``."""

    sample: Tensor
    """Float[B, ...] the next latents (given or drawn)."""
    mean: Tensor
    """Float[B, ...] the transition mean."""
    log_prob: Tensor
    """Float[B] log-density of ``sample``, averaged over elements (0 for a deterministic step)."""
    std_t: Tensor
    """Float[] ``a sqrt(s / (1 - s))`` (with the sigma = 1 cap)."""
    step_std: Tensor
    """Float[] transition std ``std_t sqrt(-d)``."""


def ode_step(x: Tensor, v: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Euler step of the flow ODE, float32: ``x + (sigma_next - sigma) v``."""
    return x.float() + (sigma_next - sigma) * v.float()


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Float[B]: log N(x; mean, std^2 I) per element, averaged over all but the first dimension."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: float = 0.8,
    sigma_cap: Optional[Scalar] = None,
    sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> SDEStep:
    """The Flow-GRPO transition from ``x`` (Float[B, ...]) with velocity ``v`` from ``sigma`` to ``sigma_next`` (scalars
    shared by the batch).

    Args:
        noise_level: ``a`` (0.8 in RL3DEdit [P]); 0 gives the Euler ODE step.
        sigma_cap: replaces ``sigma`` in ``1 - sigma`` when ``sigma >= 1`` (Flow-GRPO: the schedule's second sigma).
        sample: score this given next state (recomputing a stored transition) instead of drawing one.
        generator: CPU generator for the noise.
    Raises:
        ValueError: ``sigma >= 1`` without ``sigma_cap``, or ``sigma_next > sigma``.
    """
    x, v = x.float(), v.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    dt = sigma_next - sigma
    if float(dt) > 0:
        raise ValueError(f"an SDE step must go down in sigma, got {float(sigma)} -> {float(sigma_next)}")
    if float(sigma) >= 1.0:
        if sigma_cap is None:
            raise ValueError("sigma = 1 needs sigma_cap (the schedule's second sigma, as Flow-GRPO)")
        denom_sigma = torch.as_tensor(sigma_cap, dtype=torch.float32, device=x.device)
    else:
        denom_sigma = sigma
    std_t = noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))
    mean = x * (1.0 + std_t**2 * dt / (2.0 * sigma)) + v * (1.0 + std_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    step_std = std_t * torch.sqrt(-dt)
    if float(step_std) == 0.0:  # a = 0 (or d = 0): deterministic, no density
        out = mean if sample is None else sample.float()
        return SDEStep(out, mean, torch.zeros(x.shape[0], device=x.device), std_t, step_std)
    if sample is None:
        eps = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x.device)
        sample = mean + step_std * eps
    sample = sample.float().detach()
    return SDEStep(sample, mean, gaussian_log_prob(sample, mean, step_std), std_t, step_std)


def transition_kl(step: SDEStep, reference_mean: Tensor, kl_std: Literal["flow_grpo", "exact"] = "flow_grpo") -> Tensor:
    """Float[B]: ``mean over elements of (mean - reference_mean)^2 / (2 std^2)`` with std = ``std_t`` (Flow-GRPO) or
    the transition std (``exact``, the true KL per element)."""
    if kl_std not in ("flow_grpo", "exact"):
        raise ValueError(f"kl_std must be 'flow_grpo' or 'exact', got {kl_std!r}")
    std = step.std_t if kl_std == "flow_grpo" else step.step_std
    sq = (step.mean - reference_mean.float()) ** 2
    return sq.mean(dim=tuple(range(1, sq.ndim))) / (2 * std**2)


# ======================================================================================================================
# window schedule
# ======================================================================================================================
@dataclass
class WindowConfig:
    """Which denoising steps are stochastic and trained (MixGRPO sliding window)."""

    size: int = 4
    """Steps per window [P]."""
    schedule: Literal["advance", "random"] = "advance"
    """advance: the start moves by ``stride`` every ``shift_every`` iterations and wraps; random: a start per
    sample [I]."""
    shift_every: int = 25
    """Iterations between window moves under ``advance`` [I: MixGRPO-style, unpublished for RL3DEdit]."""
    stride: int = 1
    """Steps the window moves each time [I]."""
    max_start: Optional[int] = None
    """Last allowed start step; None = num_steps - size (the window may reach the final step) [I]."""


def window_steps(
    config: WindowConfig, num_steps: int, iteration: int = 0, generator: Optional[torch.Generator] = None
) -> List[int]:
    """The ``config.size`` consecutive step indices i (transitions sigma_i -> sigma_i+1) of the window."""
    if not 1 <= config.size <= num_steps:
        raise ValueError(f"window size {config.size} must be in [1, {num_steps}]")
    last = num_steps - config.size if config.max_start is None else min(config.max_start, num_steps - config.size)
    if last < 0:
        raise ValueError(f"max_start {config.max_start} < 0")
    if config.schedule == "advance":
        start = (iteration // max(config.shift_every, 1)) * config.stride % (last + 1)
    elif config.schedule == "random":
        start = int(torch.randint(0, last + 1, (1,), generator=generator))
    else:
        raise ValueError(f"window schedule must be 'advance' or 'random', got {config.schedule!r}")
    return list(range(start, start + config.size))


# ======================================================================================================================
# rollouts
# ======================================================================================================================
@dataclass
class Rollout:
    """A group of G trajectories from one condition; the window steps are stored for the policy update."""

    sigmas: Tensor
    """Float[S + 1] the schedule."""
    window: List[int]
    """The K window step indices (transition sigmas[i] -> sigmas[i + 1])."""
    latents: Tensor
    """Float[K, G, *shape] latents before each window step."""
    next_latents: Tensor
    """Float[K, G, *shape] latents after each window step."""
    log_probs: Tensor
    """Float[K, G] log-probabilities of the stored transitions under the sampling policy."""
    final: Tensor
    """Float[G, *shape] clean latents at sigma 0."""
    noise_level: float
    """``a`` used for the SDE steps."""
    images: Optional[Tensor] = None
    """Float[G, 3, H, W] decoded final images in [0, 1] (when decoded)."""
    extras: dict = field(default_factory=dict)
    """Free slot for callers (rewards, anchor index ...)."""

    @property
    def group_size(self) -> int:
        return int(self.final.shape[0])

    @property
    def sigma_cap(self) -> Tensor:
        """Sigma used instead of 1 in ``std_t``'s denominator (the schedule's second sigma, Flow-GRPO)."""
        return self.sigmas[1]


def _in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, micro_batch: Optional[int]) -> Tensor:
    if not micro_batch or x.shape[0] <= micro_batch:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(micro_batch)])


@torch.no_grad()
def rollout(
    policy: Policy,
    group_size: int,
    window: Sequence[int],
    steps: int = 12,
    noise_level: float = 0.8,
    generator: Optional[torch.Generator] = None,
    micro_batch: Optional[int] = None,
    decode: bool = True,
    noise: Optional[Tensor] = None,
) -> Rollout:
    """Sample ``group_size`` trajectories of ``steps`` steps (12 in RL3DEdit [P]): SDE steps on ``window``, ODE steps
    elsewhere.

    Args:
        window: step indices that are stochastic (see :func:`window_steps`).
        generator: CPU generator for the initial noise and the SDE noise.
        micro_batch: at most this many trajectories per network call (None = all G at once).
        decode: decode the final latents to images.
        noise: Float[G, *shape] initial latents at sigma 1 (default: drawn from ``generator``).
    """
    window = sorted(int(i) for i in window)
    if any(i < 0 or i >= steps for i in window):
        raise ValueError(f"window steps {window} outside [0, {steps})")
    sigmas = policy.sigmas(steps).float()
    device = sigmas.device
    shape = (group_size, *policy.latent_shape)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {list(shape)}, got {list(noise.shape)}")
    x = noise.to(device).float()
    before, after, log_probs = [], [], []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = _in_chunks(lambda z: policy.velocity(z, sigma), x, micro_batch)
        if i in window:
            step = sde_step(x, v, sigma, sigma_next, noise_level, sigmas[1], generator=generator)
            before.append(x)
            after.append(step.sample)
            log_probs.append(step.log_prob)
            x = step.sample
        else:
            x = ode_step(x, v, sigma, sigma_next)
    empty = x.new_zeros((0, *shape))
    out = Rollout(
        sigmas=sigmas,
        window=window,
        latents=torch.stack(before) if before else empty,
        next_latents=torch.stack(after) if after else empty,
        log_probs=torch.stack(log_probs) if log_probs else x.new_zeros(0, group_size),
        final=x,
        noise_level=noise_level,
    )
    if decode:
        out.images = _in_chunks(policy.decode, x, micro_batch)
    return out


def step_logprob(policy: Policy, rollout: Rollout, k: int, rows: Optional[Union[slice, Tensor]] = None) -> SDEStep:
    """Re-score the stored transition of window step ``k`` (rows ``rows`` of the group) under the current weights,
    with gradients: the new log-prob for the PPO ratio and the mean for the KL."""
    rows = slice(None) if rows is None else rows
    i = rollout.window[k]
    x, nxt = rollout.latents[k][rows], rollout.next_latents[k][rows]
    v = policy.velocity(x, rollout.sigmas[i])
    return sde_step(x, v, rollout.sigmas[i], rollout.sigmas[i + 1], rollout.noise_level, rollout.sigma_cap, nxt)


@torch.no_grad()
def reference_mean(reference: Policy, rollout: Rollout, k: int, rows: Optional[Union[slice, Tensor]] = None) -> Tensor:
    """Float[B, *shape]: the transition mean of window step ``k`` under ``reference`` (e.g. a
    :class:`ReferencePolicy`)."""
    return step_logprob(reference, rollout, k, rows).mean


def step_logprob_and_kl(
    policy: Policy,
    reference: Policy,
    rollout: Rollout,
    k: int,
    rows: Optional[Union[slice, Tensor]] = None,
    kl_std: Literal["flow_grpo", "exact"] = "flow_grpo",
) -> Tuple[Tensor, Tensor]:
    """(log_prob Float[B] with gradients, KL Float[B] to the reference) for window step ``k``."""
    ref = reference_mean(reference, rollout, k, rows)
    step = step_logprob(policy, rollout, k, rows)
    return step.log_prob, transition_kl(step, ref, kl_std)
