"""RF-Inversion's controlled forward ODE (Rout et al.), as RoMaP uses it to noise a latent before reading attention
(spec editing-methods.md §2.3 step 3) and to invert the anchor view in SLaMP (§2.5 step 2).

Sigma convention of SD3: ``z_sigma = (1 - sigma) z0 + sigma eps``, model velocity ``v = eps - z0``. The controlled
velocity blends the model's velocity with the straight-line velocity toward a fixed Gaussian target ``y1``:
``v = v_theta + gamma (v_tgt - v_theta)``, ``v_tgt = (y1 - z) / (1 - sigma)``, Euler step
``z += v (sigma_{k+1} - sigma_k)``. With gamma = 1 the path is exactly the line from ``z0`` to ``y1``:
``z_k = y1 + (z0 - y1) (1 - sigma_k) / (1 - sigma_0)``, reaching ``y1`` at sigma 1.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from gsstudio_ext.models.rectified_flow import PromptEmbeds, RectifiedFlowModel


def inversion_indices(num: int = 5, lo: float = 0.30, hi: float = 0.98, num_train_timesteps: int = 1000) -> List[int]:
    """Training-schedule indices from least to most noisy: ``hi*T, hi*T - d, ...`` with ``d = (hi - lo) T / num``.

    With the defaults: 980, 844, 708, 572, 436 (index 0 is sigma 1), i.e. sigmas 0.058, 0.357, 0.553, 0.692, 0.795
    with SD3's shift 3, the values the spec reads in RoMaP's code (§2.3 step 3).
    """
    if num < 1 or not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"need num >= 1 and 0 <= lo < hi <= 1, got num={num}, lo={lo}, hi={hi}")
    step = (hi - lo) * num_train_timesteps / num
    return [int(round(hi * num_train_timesteps - k * step)) for k in range(num)]


def inversion_timesteps(model: RectifiedFlowModel, num: int = 5, lo: float = 0.30, hi: float = 0.98) -> Tensor:
    """Float[num] sigmas of :func:`inversion_indices`, increasing (least to most noisy)."""
    idx = inversion_indices(num, lo, hi, model.config.num_train_timesteps)
    return model.sigma_at(torch.tensor(idx))


def controlled_forward_ode(
    model: RectifiedFlowModel,
    z0: Tensor,
    embeds: PromptEmbeds,
    sigmas: Tensor,
    gamma: float = 0.5,
    target: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, List[Tensor]]:
    """Run the controlled forward ODE from ``z0`` (taken to be at ``sigmas[0]``) through increasing ``sigmas``.

    Args:
        z0: Float[B, C, h, w] latent at ``sigmas[0]``.
        embeds: prompt embedding (batch 1 or B) for ``v_theta``.
        sigmas: Float[K] increasing, each < 1 except possibly the last; K - 1 model forwards are run.
        gamma: controller strength (0: plain inversion ODE, 1: straight line to ``target``).
        target: Float like ``z0``, the noise ``y1``; drawn from N(0, I) with ``generator`` when None.

    Returns:
        (latent at ``sigmas[-1]``, trajectory: list of K latents, the first being ``z0``).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().tolist()
    if any(b <= a for a, b in zip(sigmas[:-1], sigmas[1:])) or sigmas[0] < 0 or sigmas[-1] > 1:
        raise ValueError(f"sigmas must increase within [0, 1], got {sigmas}")
    if any(s >= 1.0 for s in sigmas[:-1]):
        raise ValueError("only the last sigma may reach 1 (v_tgt divides by 1 - sigma)")
    if target is None:
        device = generator.device if generator is not None else z0.device
        target = torch.randn(z0.shape, generator=generator, device=device).to(z0.device, z0.dtype)
    z = z0
    trajectory = [z0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v_theta = model.velocity(z, s, embeds)
            v_tgt = (target - z) / (1.0 - s)
            v = (1.0 - gamma) * v_theta + gamma * v_tgt  # = v_theta + gamma (v_tgt - v_theta); exact at gamma 0, 1
            z = z + v * (s_next - s)
            trajectory.append(z)
    return z, trajectory
