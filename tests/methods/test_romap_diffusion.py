"""RoMaP's diffusion path on the tiny SD3: controlled inversion ODE, part attention maps, SLaMP and regularized SDS."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gsstudio_ext.core.scene import GaussianScene  # noqa: E402
from gsstudio_ext.core.scene_render import render_scene  # noqa: E402
from gsstudio_ext.methods.romap.part_attention import part_attention_maps, segmentation_prompt  # noqa: E402
from gsstudio_ext.methods.romap.rf_inversion import (  # noqa: E402
    controlled_forward_ode,
    inversion_indices,
    inversion_timesteps,
)
from gsstudio_ext.methods.romap.rfds import (  # noqa: E402
    RFDSConfig,
    anchored_l1,
    regularized_sds_loss,
    rfds_latent_loss,
    rfds_loss,
    view_prompt,
)
from gsstudio_ext.methods.romap.slamp import SLaMPConfig, latent_mask, mix_latents, slamp_edit, slamp_latents  # noqa: E402
from gsstudio_ext.models.sd3_tiny import TinySD3Config  # noqa: E402


@pytest.fixture(scope="module")
def sd3():
    return TinySD3Config().setup().load()


def _image(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return F.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bilinear")[0]


# ---- controlled forward ODE ------------------------------------------------------------------------------------------
def test_inversion_timesteps_match_spec(sd3) -> None:
    assert inversion_indices() == [980, 844, 708, 572, 436]
    sig = inversion_timesteps(sd3)
    assert torch.allclose(sig, torch.tensor([0.0577, 0.3567, 0.5530, 0.6918, 0.7951]), atol=1e-4)


def test_controlled_ode_gamma_one_is_the_straight_line_to_the_target(sd3) -> None:
    torch.manual_seed(0)
    z0, y1 = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    sigmas = torch.tensor([0.0, 0.2, 0.45, 0.7, 1.0])
    z, traj = controlled_forward_ode(sd3, z0, sd3.empty_prompt(), sigmas, gamma=1.0, target=y1)
    assert len(traj) == 5 and traj[0] is z0
    for s, zk in zip(sigmas.tolist(), traj):  # invariant: z_k = (1 - sigma_k) z0 + sigma_k y1
        assert torch.allclose(zk, (1 - s) * z0 + s * y1, atol=1e-5)
    assert torch.allclose(z, y1, atol=1e-6)  # reaches the target noise at sigma 1


def test_controlled_ode_gamma_zero_is_the_plain_euler_inversion(sd3) -> None:
    torch.manual_seed(0)
    z0 = torch.randn(1, 4, 16, 16)
    embeds = sd3.encode_prompt(["a photo of a cat"])
    sigmas = inversion_timesteps(sd3, num=3)
    z, _ = controlled_forward_ode(sd3, z0, embeds, sigmas, gamma=0.0, target=torch.zeros_like(z0))
    ref = z0
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        ref = ref + sd3.velocity(ref, s, embeds) * (s_next - s)
    assert torch.allclose(z, ref, atol=1e-6)
    with pytest.raises(ValueError, match="increase"):
        controlled_forward_ode(sd3, z0, embeds, sigmas.flip(0))


# ---- part attention --------------------------------------------------------------------------------------------------
def test_segmentation_prompt() -> None:
    text, groups = segmentation_prompt("A photo of woman.", [["lips"], ["pump", "head"], "hair"])
    assert text == "A photo of woman with lips and pump head and hair"
    assert [g.words for g in groups] == [("lips",), ("pump", "head"), ("hair",)]
    assert [text[g.start :].split()[0] for g in groups] == ["lips", "pump", "hair"]


def test_part_attention_maps_shape_and_word_dependence(sd3) -> None:
    image = _image()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    maps = part_attention_maps(sd3, image, "A photo of woman", [["hair"], ["lips"]], generator=gen())
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()
    assert (maps[0] - maps[1]).abs().max() > 1e-3  # different words, different maps
    again = part_attention_maps(sd3, image, "A photo of woman", [["hair"], ["lips"]], generator=gen())
    assert torch.equal(maps, again)  # deterministic given the generator
    other = part_attention_maps(sd3, image, "A photo of woman", [["hair"], ["eyes"]], generator=gen())
    assert (other[1] - maps[1]).abs().max() > 1e-3
    # a multi-token part is the mean of its token rows; the map still has one [h, w] slice
    multi = part_attention_maps(sd3, image, "A photo of woman", [["croissant"]], generator=gen())
    assert multi.shape == (1, 16, 16) and torch.isfinite(multi).all()


# ---- SLaMP -----------------------------------------------------------------------------------------------------------
def test_mix_latents_exact_at_zero_and_one() -> None:
    torch.manual_seed(0)
    z, z_src = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1.0
    assert torch.equal(mix_latents(z, z_src, mask, 0.0), z)
    out = mix_latents(z, z_src, mask, 1.0)
    inside = mask.expand_as(z).bool()
    assert torch.equal(out[inside], z[inside]) and torch.equal(out[~inside], z_src[~inside])
    half = mix_latents(z, z_src, mask, 0.2)
    assert torch.allclose(half[~inside], (0.8 * z + 0.2 * z_src)[~inside], atol=1e-6)


def _part_mask(size: int = 64) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[20:44, 16:40] = True
    return mask


def test_slamp_end_to_end_and_background_kept(sd3) -> None:
    image, mask, prompt = _image(), _part_mask(), "a photo of woman with gold lips"
    calls = []
    cfg = SLaMPConfig(num_steps=4, mix_steps=2)
    out = slamp_edit(sd3, image, mask, prompt, cfg, torch.Generator().manual_seed(0), lambda d, t: calls.append((d, t)))
    assert out.shape == (3, 64, 64) and out.min() >= 0 and out.max() <= 1
    assert calls[0] == (4, 8) and calls[-1] == (8, 8) and len(calls) == 5
    # alpha_last = 1 for all N steps: outside the latent mask the latent is the source latent, bit for bit
    keep = SLaMPConfig(num_steps=4, mix_steps=4, alpha_last=1.0)
    z, z_src, m = slamp_latents(sd3, image, mask, prompt, keep, torch.Generator().manual_seed(0))
    assert torch.equal(m, latent_mask(mask, (32, 32)))
    outside = (m == 0).expand_as(z)
    assert torch.equal(z[outside], z_src[outside]) and (z - z_src)[~outside].abs().max() > 1e-2
    # the image is exactly the decode of that latent ...
    edited = slamp_edit(sd3, image, mask, prompt, keep, torch.Generator().manual_seed(0))
    assert torch.equal(edited, sd3.decode(z)[0])
    # ... but the VAE decoder is not local (3x3 convs, mid-block attention, GroupNorm statistics over the whole
    # image), so in pixels the background only stays close to decode(z_src): mean error outside the mask dilated by
    # 8 px was 0.024 against 0.17 inside with the tiny random decoder; we assert a 3x margin.
    source = sd3.decode(z_src)[0]
    far = ~(F.max_pool2d(mask[None, None].float(), 17, stride=1, padding=8)[0, 0].bool())
    outside_err = (edited - source).abs()[:, far].mean()
    inside_err = (edited - source).abs()[:, mask].mean()
    assert inside_err > 3 * outside_err


def test_slamp_trajectory_mix_target_runs(sd3) -> None:
    cfg = SLaMPConfig(num_steps=3, mix_steps=1, mix_target="inversion_trajectory")
    z, z_src, m = slamp_latents(sd3, _image(), _part_mask(), "gold lips", cfg, torch.Generator().manual_seed(1))
    outside = (m == 0).expand_as(z)
    assert torch.equal(z[outside], z_src[outside])  # last step mixes with trajectory[0] = the source latent


# ---- regularized SDS -------------------------------------------------------------------------------------------------
def test_view_prompt() -> None:
    cases = {0: "front", 30: "front", 31: "side", -90: "side", 149: "side", 150: "back", 180: "back", -170: "back"}
    for az, view in cases.items():
        assert view_prompt("a man with gold hair.", az) == f"a man with gold hair, {view} view"
    assert view_prompt("x", 400) == "x, side view"  # 400 = 40 degrees


def test_anchored_l1_exact() -> None:
    render = torch.zeros(1, 3, 8, 8, requires_grad=True)
    target = torch.full((1, 3, 8, 8), 0.5)
    target[..., :, 4:] = 9.0  # large error outside the mask is ignored
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :4] = True
    loss = anchored_l1(render, target, mask)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.all(render.grad[..., 4:] == 0) and torch.allclose(render.grad[..., :4], torch.tensor(-1 / 96))
    assert float(anchored_l1(render, target, torch.zeros(8, 8, dtype=torch.bool))) == 0.0


def test_rfds_latent_gradient_zero_outside_latent_mask(sd3) -> None:
    torch.manual_seed(0)
    cond, uncond = sd3.encode_prompt(["a woman with gold lips"]), sd3.encode_prompt([""])
    z = torch.randn(1, 4, 32, 32, requires_grad=True)
    m = latent_mask(_part_mask(), (32, 32))
    loss = rfds_latent_loss(sd3, z, m, cond, uncond, RFDSConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    outside = (m == 0).expand_as(z)
    assert torch.isfinite(loss) and float(loss) > 0
    assert torch.all(z.grad[outside] == 0) and z.grad[~outside].abs().min() > 0


def test_rfds_image_gradient_zero_outside_mask_and_value_unchanged(sd3) -> None:
    cond, uncond = sd3.encode_prompt(["a woman with gold lips"]), sd3.encode_prompt([""])
    mask = _part_mask()
    losses = {}
    for detach in (True, False):
        render = _image()[None].clone().requires_grad_(True)
        cfg = RFDSConfig(detach_outside_mask=detach)
        loss = rfds_loss(sd3, render, mask, cond, uncond, cfg, torch.Generator().manual_seed(0))
        loss.backward()
        losses[detach] = (float(loss), render.grad)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-6)
    grad = losses[True][1][0]
    assert torch.all(grad[:, ~mask] == 0) and grad[:, mask].abs().sum() > 0
    # without the detach, the VAE encoder (convs + GroupNorm) spreads gradient outside the mask
    assert losses[False][1][0][:, ~mask].abs().sum() > 0
    terms = regularized_sds_loss(
        sd3, _image()[None], mask, cond, uncond, RFDSConfig(), torch.Generator().manual_seed(0),
        anchor_render=torch.zeros(1, 3, 64, 64), anchor_target=torch.full((1, 3, 64, 64), 0.25),
    )  # fmt: skip
    assert float(terms["sds"]) == pytest.approx(losses[True][0], rel=1e-6)
    assert float(terms["l1"]) == pytest.approx(10 * 0.25) and torch.equal(terms["total"], terms["sds"] + terms["l1"])


def test_rfds_gradient_reaches_only_gaussians_inside_the_mask(sd3) -> None:
    """Two blobs of 2 Gaussians, one projecting into the left-half mask, one into the right half."""
    n = 4
    means = torch.tensor([[-0.5, 0.0, 2.0], [-0.45, 0.05, 2.0], [0.5, 0.0, 2.0], [0.45, -0.05, 2.0]])
    scene = GaussianScene(
        means=means.clone().requires_grad_(True),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        log_scales=torch.full((n, 3), -3.0),
        opacity_logits=torch.full((n,), 2.0).requires_grad_(True),
        sh_dc=torch.rand(n, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True),
        sh_rest=torch.zeros(n, 0, 3),
    )
    K = torch.tensor([[[64.0, 0, 32], [0, 64.0, 32], [0, 0, 1]]])
    rgb = render_scene(scene, torch.eye(4)[None], K, 64, 64, background=torch.full((3,), 0.5), backend="torch").rgb
    render = rgb.permute(0, 3, 1, 2)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:, :32] = True
    cond, uncond = sd3.encode_prompt(["gold lips"]), sd3.encode_prompt([""])
    loss = rfds_loss(sd3, render, mask, cond, uncond, RFDSConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    for param in (scene.means, scene.opacity_logits, scene.sh_dc):
        assert torch.all(param.grad[2:] == 0), "Gaussians outside the mask got a gradient"
        assert param.grad[:2].abs().sum() > 0, "Gaussians inside the mask got no gradient"
