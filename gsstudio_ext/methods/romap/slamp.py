"""SLaMP: Scheduled Latent Mixing and Part editing of one anchor view (RoMaP, spec §2.5, Algorithm 2).

The prior-removed anchor render is inverted to noise with the controlled forward ODE (unconditional prompt), then
regenerated with the edit prompt under classifier-free guidance. After every step the latent outside the part is
mixed back toward the source, weakly (``alpha_base``) for most of the trajectory and strongly (``alpha_last``) for
the last ``t_s`` steps: ``z <- z (1 - M_inv) + z_src M_inv`` with ``M_inv = F (1 - M2D)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.methods.romap.rf_inversion import controlled_forward_ode
from gsstudio_ext.models.rectified_flow import PromptEmbeds, RectifiedFlowModel

DEFAULT_NEGATIVE = "blurry, low quality, deformed, distorted, artifacts, watermark, text"


@dataclass
class SLaMPConfig:
    """SLaMP settings. The paper publishes none of these values: each is an [I] decision (spec §2.5)."""

    num_steps: int = 20
    """[I] Denoising steps N (matches the t axis of the paper's Fig. 6 / S.7 sweep)."""
    mix_steps: int = 10
    """[I] t_s: the last t_s steps mix with ``alpha_last``, the earlier ones with ``alpha_base``."""
    alpha_base: float = 0.2
    """[I] Mixing weight toward the source outside the part during the first N - t_s steps."""
    alpha_last: float = 1.0
    """[I] Mixing weight outside the part during the last t_s steps (1 = background copied from the source)."""
    eta: float = 0.9
    """[I] Controller strength toward the clean source latent, RF-Inversion style, early steps only."""
    eta_fraction: float = 0.25
    """[I] Fraction of the steps (from the start) that use ``eta``; 0 afterwards."""
    guidance_scale: float = 7.0
    """[I] Classifier-free guidance scale c of the edit prompt against the negative prompt."""
    gamma: float = 0.5
    """[I] Controller strength of the inversion toward the fixed noise (RF-Inversion's default)."""
    mix_target: Literal["clean", "inversion_trajectory"] = "clean"
    """[I] Mix with the clean source latent (Algorithm 2, default) or the inversion latent at that sigma (Eq. 4)."""
    negative_prompt: str = DEFAULT_NEGATIVE
    """[I] Negative prompt of the guidance."""
    mask_threshold: float = 0.5
    """The 2D mask is bilinearly resized to the latent grid and thresholded at this value (as RoMaP's SDS mask)."""


def latent_mask(mask2d: Tensor, size: Tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Bool[H, W] pixel mask -> Float[1, 1, h, w] of 0/1: bilinear resize to ``size``, then ``> threshold``."""
    if mask2d.ndim != 2:
        raise ValueError(f"mask2d must be [H, W], got {tuple(mask2d.shape)}")
    m = F.interpolate(mask2d[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return (m > threshold).float()


def mix_latents(z: Tensor, z_src: Tensor, mask_latent: Tensor, weight: float) -> Tensor:
    """``z (1 - M_inv) + z_src M_inv`` with ``M_inv = weight (1 - mask_latent)``; mask 1 inside the edited part.

    Written in this form (not a lerp) so it is exact: weight 0 returns ``z``; weight 1 returns ``z_src`` where the
    mask is 0 and ``z`` where it is 1.
    """
    m_inv = weight * (1.0 - mask_latent)
    return z * (1.0 - m_inv) + z_src * m_inv


def slamp_latents(
    model: RectifiedFlowModel,
    image: Tensor,
    mask2d: Tensor,
    edit_prompt: str,
    config: Optional[SLaMPConfig] = None,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """SLaMP in latent space. Returns (edited latent, source latent, latent mask), Float[1, C, h, w] each
    (mask [1, 1, h, w]). Arguments as :func:`slamp_edit`."""
    c = config or SLaMPConfig()
    if not 0 <= c.mix_steps <= c.num_steps or c.num_steps < 1:
        raise ValueError(f"need 1 <= num_steps and 0 <= mix_steps <= num_steps, got {c.num_steps}, {c.mix_steps}")
    total = 2 * c.num_steps
    with torch.no_grad():
        z_src = model.encode_image(image[None].to(model.device)).float()
        mask = latent_mask(mask2d.to(model.device), z_src.shape[-2:], c.mask_threshold)
        sigmas = model.sigmas(c.num_steps)  # [N + 1], 1 -> 0
        # 1) controlled inversion to noise with the unconditional prompt
        z, trajectory = controlled_forward_ode(
            model, z_src, model.empty_prompt(), sigmas.flip(0), c.gamma, generator=generator
        )
        if progress is not None:
            progress(c.num_steps, total)
        # 2) guided generation with scheduled mixing outside the part
        guide = PromptEmbeds.cat([model.encode_prompt([c.negative_prompt]), model.encode_prompt([edit_prompt])])
        eta_steps = int(round(c.eta_fraction * c.num_steps))
        for i in range(c.num_steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            v_neg, v_pos = model.velocity(torch.cat([z, z]), s, guide).chunk(2)
            v = v_neg + c.guidance_scale * (v_pos - v_neg)
            if i < eta_steps and c.eta > 0:
                v_tgt = (z - z_src) / s  # straight line to the clean source at sigma 0
                v = (1.0 - c.eta) * v + c.eta * v_tgt
            z = z + v * (s_next - s)
            source = z_src if c.mix_target == "clean" else trajectory[c.num_steps - i - 1]
            weight = c.alpha_last if i >= c.num_steps - c.mix_steps else c.alpha_base
            z = mix_latents(z, source, mask, weight)
            if progress is not None:
                progress(c.num_steps + i + 1, total)
    return z, z_src, mask


def slamp_edit(
    model: RectifiedFlowModel,
    image: Tensor,
    mask2d: Tensor,
    edit_prompt: str,
    config: Optional[SLaMPConfig] = None,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Tensor:
    """Part-edit ``image`` Float[3, H, W] in [0, 1] inside ``mask2d`` Bool[H, W] toward ``edit_prompt``.

    ``progress(done, total)`` is called after the inversion and after each generation step. Returns Float[3, H, W]
    in [0, 1] (the VAE decode of the edited latent).
    """
    z, _, _ = slamp_latents(model, image, mask2d, edit_prompt, config, generator, progress)
    with torch.no_grad():
        return model.decode(z)[0].float()
