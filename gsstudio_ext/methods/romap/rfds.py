"""Regularized SDS of RoMaP Stage D (spec §2.6): a masked rectified-flow SDS term ("RFDS" with one unconditional
noise-correction pass) plus an L1 anchor to the SLaMP-edited view.

RFDS for a render x, z = E(x): pick sigma from the schedule indices [0.30, 0.98] x 1000, eps ~ N(0, I),
``z_t = sigma eps + (1 - sigma) z``; ``eps' = eps + (1 - sigma)(v_uncond(z_t) + z - eps)`` (the model's noise
estimate); at ``z'_t = sigma eps' + (1 - sigma) z`` the CFG velocity ``v = v_u + s (v_c - v_u)``; loss
``|| (eps' - z - sg[v]) * M ||^2 / B`` over latent positions of the downsampled part mask M. Its gradient on z is
``2 M (z - (eps' - v)) / B``: it pulls z toward the model's clean estimate, only inside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from gsstudio_ext.methods.romap.slamp import latent_mask
from gsstudio_ext.models.rectified_flow import PromptEmbeds, RectifiedFlowModel

DEFAULT_SDS_NEGATIVE = (
    "blurry, low quality, low resolution, oversaturated, deformed, disfigured, distorted, cropped, out of frame, "
    "duplicate, extra limbs, bad anatomy, watermark, text, jpeg artifacts, noisy, grainy, cartoon, sketch"
)


@dataclass
class RFDSConfig:
    """Regularized-SDS settings (values from RoMaP's guidance config unless marked [I])."""

    min_step: float = 0.30
    """Lowest sampled schedule index as a fraction of 1000 (index 0 = sigma 1; 0.98 -> sigma ~0.06)."""
    max_step: float = 0.98
    """Highest sampled schedule index fraction (0.30 -> sigma ~0.875 with SD3's shift 3)."""
    guidance_scale: float = 100.0
    """Classifier-free guidance scale s of the SDS velocity."""
    lambda_sds: float = 1.0
    """Weight lambda_1 of the masked SDS term (lambda_rfds = 1 in the code)."""
    lambda_l1: float = 10.0
    """[I] Weight lambda_2 of the masked L1 anchor term on [0, 1] RGB (unpublished)."""
    front_threshold: float = 30.0
    """|azimuth| up to this many degrees gets the "front view" suffix."""
    back_threshold: float = 30.0
    """|azimuth| from 180 minus this many degrees gets the "back view" suffix; the rest "side view"."""
    view_suffixes: Tuple[str, str, str] = ("front view", "side view", "back view")
    """Suffixes appended as ", <suffix>" to the edit prompt for front, side and back cameras."""
    negative_prompt: str = DEFAULT_SDS_NEGATIVE
    """[I] Negative (unconditional) prompt; the code's long list is not reproduced, this one is ours."""
    mask_threshold: float = 0.5
    """The 2D mask resized (bilinear) to the latent grid counts where it is above this value."""
    reduction: Literal["sum", "mean"] = "sum"
    """[I] "sum": squared error summed over masked latent elements / batch (threestudio SDS convention); "mean":
    averaged over masked elements."""
    detach_outside_mask: bool = True
    """[I] Detach the render outside the 2D mask before the VAE encode, so no pixel (hence no Gaussian drawn only
    there) outside the mask gets a gradient; the VAE still sees the full image, so the loss value is unchanged."""


def view_prompt(prompt: str, azimuth_deg: float, config: Optional[RFDSConfig] = None) -> str:
    """``"<prompt>, front view"`` etc. from the camera azimuth (degrees, 0 = facing the object's front)."""
    c = config or RFDSConfig()
    a = abs((float(azimuth_deg) + 180.0) % 360.0 - 180.0)  # |azimuth| in [0, 180]
    if a <= c.front_threshold:
        suffix = c.view_suffixes[0]
    elif a >= 180.0 - c.back_threshold:
        suffix = c.view_suffixes[2]
    else:
        suffix = c.view_suffixes[1]
    return f"{prompt.strip().rstrip('.,')}, {suffix}"


def rfds_latent_loss(
    model: RectifiedFlowModel,
    z: Tensor,
    mask_latent: Tensor,
    cond_embeds: PromptEmbeds,
    uncond_embeds: PromptEmbeds,
    config: Optional[RFDSConfig] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Masked RFDS loss of latents ``z`` Float[B, C, h, w] (differentiable); ``mask_latent`` Float[B or 1, 1, h, w]
    of 0/1. Three transformer passes (1 unconditional + a CFG pair) run without gradient."""
    c = config or RFDSConfig()
    batch, device = z.shape[0], z.device
    steps = model.config.num_train_timesteps
    lo, hi = int(round(c.min_step * steps)), int(round(c.max_step * steps))
    gen_device = generator.device if generator is not None else device
    index = torch.randint(lo, hi + 1, (batch,), generator=generator, device=gen_device)
    sigma = model.sigma_at(index.cpu()).to(device, torch.float32)
    eps = torch.randn(z.shape, generator=generator, device=gen_device).to(device, torch.float32)
    s = sigma.view(batch, 1, 1, 1)
    with torch.no_grad():
        z0 = z.detach().float()
        v_u = model.velocity(s * eps + (1.0 - s) * z0, sigma, uncond_embeds.expand(batch)).float()
        eps_c = eps + (1.0 - s) * (v_u + z0 - eps)  # noise correction (the model's noise estimate)
        z_t = s * eps_c + (1.0 - s) * z0
        guide = PromptEmbeds.cat([uncond_embeds.expand(batch), cond_embeds.expand(batch)])
        v_n, v_c = model.velocity(torch.cat([z_t, z_t]), torch.cat([sigma, sigma]), guide).float().chunk(2)
        target = eps_c - (v_n + c.guidance_scale * (v_c - v_n))
    m = mask_latent.to(device, torch.float32)
    err = (z.float() - target) * m  # = -(eps' - z - v) inside the mask, exactly 0 outside
    if c.reduction == "sum":
        return err.pow(2).sum() / batch
    count = (m.expand_as(err)).sum().clamp_min(1.0)
    return err.pow(2).sum() / count


def rfds_loss(
    model: RectifiedFlowModel,
    render: Tensor,
    mask2d: Tensor,
    cond_embeds: PromptEmbeds,
    uncond_embeds: PromptEmbeds,
    config: Optional[RFDSConfig] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Masked RFDS loss of ``render`` Float[B, 3, H, W] in [0, 1] (differentiable; the gradient flows through the
    VAE encode only) for the part ``mask2d`` Bool[H, W], counted on the latent cells where the bilinearly
    downsampled mask exceeds ``mask_threshold``."""
    c = config or RFDSConfig()
    x = render
    if c.detach_outside_mask:
        m = mask2d.to(render.device, render.dtype)
        x = render * m + render.detach() * (1.0 - m)
    z = model.encode_image(x)
    mask = latent_mask(mask2d.to(z.device), z.shape[-2:], c.mask_threshold)
    return rfds_latent_loss(model, z, mask, cond_embeds, uncond_embeds, c, generator)


def anchored_l1(render: Tensor, target: Tensor, mask2d: Tensor) -> Tensor:
    """Mean |render - target| over the pixels (and channels) of ``mask2d`` Bool[H, W]; images [..., 3, H, W].
    Zero (with a graph) when the mask is empty."""
    m = mask2d.to(render.device, render.dtype)
    diff = (render - target.to(render.device, render.dtype)).abs() * m
    count = m.sum() * (diff.numel() // m.numel())
    return diff.sum() / count.clamp_min(1.0)


def regularized_sds_loss(
    model: RectifiedFlowModel,
    render: Tensor,
    mask2d: Tensor,
    cond_embeds: PromptEmbeds,
    uncond_embeds: PromptEmbeds,
    config: Optional[RFDSConfig] = None,
    generator: Optional[torch.Generator] = None,
    anchor_render: Optional[Tensor] = None,
    anchor_target: Optional[Tensor] = None,
    anchor_mask: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """``lambda_sds * RFDS(render, mask2d) + lambda_l1 * L1(anchor_render, SLaMP anchor_target, anchor_mask)``.

    The L1 term is used when an anchor render and target are given (``anchor_mask`` defaults to ``mask2d``).
    Returns {"sds", "l1", "total"} (weighted terms; "l1" is 0 without an anchor).
    """
    c = config or RFDSConfig()
    sds = c.lambda_sds * rfds_loss(model, render, mask2d, cond_embeds, uncond_embeds, c, generator)
    if anchor_render is not None and anchor_target is not None:
        mask = anchor_mask if anchor_mask is not None else mask2d
        l1 = c.lambda_l1 * anchored_l1(anchor_render, anchor_target, mask)
    else:
        l1 = torch.zeros((), device=sds.device, dtype=sds.dtype)
    return {"sds": sds, "l1": l1, "total": sds + l1}
