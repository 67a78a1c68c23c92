"""FLUX.1-Kontext image editor: prompts, VAE, packed latents, velocity, dynamic-shift schedule, edit and a policy view.

Backends: :class:`FluxKontextConfig` (``black-forest-labs/FLUX.1-Kontext-dev`` in the diffusers layout from the local
HF cache or a folder, optionally with the RL3DEdit transformer ``exander/RL3DEdit`` loaded with
``FluxTransformer2DModel.from_single_file``; gated, never available on the build machines) and
:class:`~gsstudio_ext.models.flux_tiny.TinyFluxKontextConfig` (the same diffusers/transformers classes from tiny configs
with seeded random weights and locally built tokenizers, for tests).

The denoising loop is our own (not ``FluxKontextPipeline.__call__``) because GRPO needs per-step control; it follows the
pipeline of diffusers 0.42.1 step for step (a test compares both on the tiny model):

- latents ``[B, C, h, w]`` (h = H / 8) are packed 2x2 into tokens ``[B, h/2 * w/2, 4C]`` (Flux: ``[1, 4096, 64]`` for
  a 1024^2 image); token ids ``[L, 3]`` = (image index, row, column), index 0 for the generated image and 1 for the
  condition image, whose tokens are appended after the generated ones;
- ``x_sigma = (1 - sigma) x0 + sigma eps`` and the transformer predicts ``v = eps - x0``; an Euler step is
  ``x += (sigma_next - sigma) v``;
- sigmas: ``linspace(1, 1/N, N)`` shifted by ``exp(mu) / (exp(mu) + 1/s - 1)`` with ``mu`` linear in the generated
  image's token count (``calculate_shift``), then a final 0;
- the guidance scale (2.5 in RL3DEdit [C]) is Flux's distilled guidance embedding; there is no true CFG.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.errors import MissingWeightsError, hf_cache_dir, looks_like_path, require_path
from gsstudio_ext.models.provider import Device, LazyProvider

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KONTEXT_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
RL3DEDIT_REPO = "exander/RL3DEdit"
RL3DEDIT_FILE = "rl3dedit-flux-kontext.safetensors"


# ======================================================================================================================
# containers and pure helpers
# ======================================================================================================================
@dataclass
class KontextPrompt:
    """Encoded instructions: the T5 sequence and the pooled CLIP vector."""

    prompt: Tensor
    """Float[B, T, D]: T5 hidden states (FLUX: T = 512, D = 4096)."""
    pooled: Tensor
    """Float[B, Dp]: CLIP-L pooled output (FLUX: 768)."""

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def expand(self, batch: int) -> "KontextPrompt":
        """Repeat a single prompt to ``batch`` rows (no-op when the batch already matches)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} prompts to a batch of {batch}")
        return KontextPrompt(self.prompt.expand(batch, -1, -1), self.pooled.expand(batch, -1))


@dataclass
class KontextImage:
    """Packed VAE latents of an image with their token ids."""

    latents: Tensor
    """Float[B, L, 4C]: 2x2-packed latents (``(z - shift) * scale`` of the VAE mean)."""
    ids: Tensor
    """Float[L, 3]: (image index, row, column) per token; index 1 for a condition image."""
    size: Tuple[int, int]
    """(H, W) of the image in pixels."""


def pack_latents(z: Tensor) -> Tensor:
    """Float[B, C, h, w] (h, w even) -> Float[B, h/2 * w/2, 4C]; each token holds one 2x2 cell, channel-major."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: Float[B, h/2 * w/2, 4C] -> Float[B, C, h, w]."""
    b, _, d = x.shape
    x = x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_ids(rows: int, cols: int, index: int = 0, device: Device = "cpu") -> Tensor:
    """Float[rows * cols, 3] token ids (index, row, col), row-major like :func:`pack_latents`."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.full_like(r, index), r, c], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=torch.float32)


def calculate_shift(
    seq_len: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the token count, ``base_shift`` at ``base_len`` tokens and
    ``max_shift`` at ``max_len`` (1024^2 px -> 4096 tokens -> 1.15)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * slope + base_shift - slope * base_len


def shifted_sigmas(num_steps: int, mu: float) -> Tensor:
    """Float[num_steps + 1]: ``linspace(1, 1/N, N)`` time-shifted by ``exp(mu) / (exp(mu) + 1/s - 1)``, then 0.
    Computed in float32 numpy as diffusers' ``FlowMatchEulerDiscreteScheduler`` does (first entry exactly 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / base - 1.0))
    return torch.cat([torch.from_numpy(np.asarray(shifted)).float(), torch.zeros(1)])


def kontext_buckets(scale: float = 1.0, multiple_of: int = 16) -> List[Tuple[int, int]]:
    """The 17 preferred Kontext resolutions (W, H) from diffusers (``PREFERRED_KONTEXT_RESOLUTIONS``, (672, 1568) to
    (1568, 672)), times ``scale`` and floored to ``multiple_of`` (tiny models use a small scale)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    out = []
    for w, h in PREFERRED_KONTEXT_RESOLUTIONS:
        sw, sh = int(w * scale) // multiple_of * multiple_of, int(h * scale) // multiple_of * multiple_of
        if sw < multiple_of or sh < multiple_of:
            raise ValueError(f"bucket scale {scale} makes ({w}, {h}) smaller than {multiple_of} px")
        out.append((sw, sh))
    return out


# ======================================================================================================================
# provider
# ======================================================================================================================
@dataclass
class KontextEditorConfig(InstantiateConfig):
    """Settings shared by the FLUX.1-Kontext backends."""

    _target: Type = field(default_factory=lambda: KontextEditor)
    dtype: str = "float32"
    """Weights and activations: float32, float16 or bfloat16."""
    guidance: float = 2.5
    """Distilled guidance scale (RL3DEdit release: 2.5 [C]; diffusers default 3.5)."""
    num_steps: int = 28
    """Denoising steps of :meth:`KontextEditor.edit` (RL3DEdit release: 28 [C])."""
    max_sequence_length: int = 512
    """T5 tokens (FLUX: 512, the pipeline default)."""
    base_image_seq_len: int = 256
    """Token count at which the schedule shift is ``base_shift`` (FLUX scheduler config [C])."""
    max_image_seq_len: int = 4096
    """Token count at which the schedule shift is ``max_shift`` (FLUX scheduler config [C])."""
    base_shift: float = 0.5
    """Shift ``mu`` at ``base_image_seq_len`` tokens (FLUX scheduler config [C])."""
    max_shift: float = 1.15
    """Shift ``mu`` at ``max_image_seq_len`` tokens (FLUX scheduler config [C])."""
    bucket_scale: float = 1.0
    """Scale of the 17 preferred Kontext resolutions (1 for real models; tiny models use small grids)."""
    cpu_offload: bool = False
    """Keep components on the CPU and move only the one in use to the device (as diffusers' model CPU offload)."""
    lora_path: Optional[Path] = None
    """LoRA safetensors (ours or diffusers/peft-named) attached to the transformer at load; None = none."""
    cache_size: int = 64
    """Encoded prompts kept in memory (least recently used evicted)."""


class KontextEditor(LazyProvider):
    """FLUX.1-Kontext components behind a small API; ``model`` is a ModuleDict (transformer, vae, text_encoder,
    text_encoder_2). Images are Float[B, 3, H, W] in [0, 1] with H, W multiples of :attr:`multiple_of`."""

    config: KontextEditorConfig

    def __init__(self, config: KontextEditorConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.tokenizers: List[Any] = []
        self._prompts: "OrderedDict[str, Tuple[Tensor, Tensor]]" = OrderedDict()
        self._resident: Optional[str] = None  # component on the device under cpu_offload

    @abstractmethod
    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        """Return (components by name, [clip tokenizer, t5 tokenizer])."""

    def _load(self) -> None:
        modules, self.tokenizers = self._build()
        home = torch.device("cpu") if self._offloading else self.device
        for m in modules.values():
            m.to(home)
            if next(m.parameters()).dtype != self.dtype:
                m.to(self.dtype)
        if self.config.lora_path is not None:
            from gsstudio_ext.models.lora import load_lora_state_dict

            load_lora_state_dict(modules["transformer"], self.config.lora_path)
        self.model = torch.nn.ModuleDict(modules)

    def to(self, device: Device) -> "KontextEditor":
        """Set the execution device; moves the components too unless ``cpu_offload`` keeps them on the CPU."""
        self.device = torch.device(device)
        if self.model is not None and not self._offloading:
            self.model.to(self.device)
        for key, (prompt, pooled) in self._prompts.items():
            self._prompts[key] = (prompt.to(self.device), pooled.to(self.device))
        return self

    @property
    def _offloading(self) -> bool:
        return self.config.cpu_offload and self.device.type != "cpu"

    def _place(self, name: str) -> Any:
        """The component ``name`` on the execution device (under cpu_offload, the previous one goes back to the CPU)."""
        module = self.load().model[name]
        if self._offloading and self._resident != name:
            if self._resident is not None and self._resident in self.model:
                self.model[self._resident].to("cpu")
            module.to(self.device)
            self._resident = name
        return module

    # ---- properties ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.config.dtype]

    @property
    def transformer(self) -> Any:
        """The FluxTransformer2DModel (where a LoRA is attached)."""
        return self.load().model["transformer"]

    @property
    def vae(self) -> Any:
        return self.load().model["vae"]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (FLUX: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def multiple_of(self) -> int:
        """Image sides must be multiples of this (VAE factor x 2x2 packing; FLUX: 16)."""
        return 2 * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def buckets(self) -> List[Tuple[int, int]]:
        """Preferred (W, H) resolutions of this model (the 17 Kontext buckets times ``bucket_scale``)."""
        return kontext_buckets(self.config.bucket_scale, self.multiple_of)

    # ---- prompts -------------------------------------------------------------------------------------------------
    def encode_prompt(self, texts: Union[str, Sequence[str]]) -> KontextPrompt:
        """Encode instructions (cached by string); works after :meth:`release_text_encoders` for cached ones only."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            self.load()
            missing = [t for t in dict.fromkeys(texts) if t not in self._prompts]
            if missing:
                if "text_encoder" not in self.model:
                    raise RuntimeError(f"text encoders were released; encode {missing!r} before release_text_encoders")
                with torch.no_grad():
                    prompt, pooled = self._encode_batch(missing)
                for i, t in enumerate(missing):
                    self._prompts[t] = (prompt[i], pooled[i])
            found = []
            for t in texts:
                self._prompts.move_to_end(t)
                found.append(self._prompts[t])
            while len(self._prompts) > max(self.config.cache_size, len(texts)):
                self._prompts.popitem(last=False)
        prompts, pooled = zip(*found)
        return KontextPrompt(torch.stack(prompts), torch.stack(pooled))

    def _encode_batch(self, texts: List[str]) -> Tuple[Tensor, Tensor]:
        clip_tok, t5_tok = self.tokenizers
        kw: Dict[str, Any] = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
        ids = clip_tok(texts, max_length=clip_tok.model_max_length, **kw)["input_ids"]
        pooled = self._place("text_encoder")(ids.to(self.device)).pooler_output  # CLIP: pooled output only
        ids = t5_tok(texts, max_length=self.config.max_sequence_length, **kw)["input_ids"]
        prompt = self._place("text_encoder_2")(ids.to(self.device))[0]
        return prompt.to(self.dtype), pooled.to(self.dtype)

    def release_text_encoders(self) -> None:
        """Drop CLIP and T5 (FLUX: ~10 GB); cached prompts stay usable."""
        with self._lock:
            if self.model is not None:
                for name in ("text_encoder", "text_encoder_2"):
                    if name in self.model:
                        del self.model[name]
                        self._resident = None if self._resident == name else self._resident

    # ---- VAE -----------------------------------------------------------------------------------------------------
    def _check_image(self, x: Tensor) -> None:
        m = self.multiple_of
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"image must be [B, 3, H, W] with H, W multiples of {m}, got {tuple(x.shape)}")

    def token_grid(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """(rows, cols) of packed tokens for an image of ``size`` = (H, W) pixels."""
        f = self.multiple_of
        return size[0] // f, size[1] // f

    def encode_image(self, x: Tensor, index: int = 1) -> KontextImage:
        """x: Float[B, 3, H, W] in [0, 1] -> packed latents with ids of image ``index`` (1 = condition image)."""
        self._check_image(x)
        vae = self._place("vae")
        z = vae.encode(2.0 * x.to(self.device, self.dtype) - 1.0).latent_dist.mean
        z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        rows, cols = self.token_grid(tuple(x.shape[-2:]))
        return KontextImage(pack_latents(z), latent_ids(rows, cols, index, self.device), (x.shape[-2], x.shape[-1]))

    def decode(self, latents: Tensor, size: Tuple[int, int]) -> Tensor:
        """Float[B, L, 4C] packed latents of an image of ``size`` (H, W) -> Float[B, 3, H, W] in [0, 1] (float32)."""
        vae = self._place("vae")
        f = self.vae_scale_factor
        z = unpack_latents(latents.to(self.device, self.dtype), size[0] // f, size[1] // f)
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(z).sample.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- transformer ---------------------------------------------------------------------------------------------
    def velocity(
        self,
        latents: Tensor,
        cond: KontextImage,
        sigma: Union[float, Tensor],
        embeds: KontextPrompt,
        guidance: Optional[float] = None,
        size: Optional[Tuple[int, int]] = None,
    ) -> Tensor:
        """v = eps - x0 of the generated image at noise level ``sigma`` (scalar or Float[B]).

        Args:
            latents: Float[B, L, 4C] packed noisy latents of an image of ``size`` (default: the condition's size).
            cond: condition image (batch 1 or B), its tokens appended after the generated ones.
            embeds: instruction encoding of batch 1 or B.
            guidance: distilled guidance scale (default ``config.guidance``).
        Returns:
            Float[B, L, 4C] in ``latents``' dtype.
        """
        tr = self._place("transformer")
        batch, length = latents.shape[:2]
        rows, cols = self.token_grid(size or cond.size)
        if rows * cols != length:
            raise ValueError(f"latents have {length} tokens, an image of {size or cond.size} has {rows * cols}")
        sigma = torch.as_tensor(sigma, device=self.device, dtype=torch.float32).reshape(-1).expand(batch)
        g = self.config.guidance if guidance is None else guidance
        guide = torch.full((batch,), g, device=self.device) if tr.config.guidance_embeds else None
        embeds = embeds.expand(batch)
        cond_latents = cond.latents.expand(batch, -1, -1) if cond.latents.shape[0] == 1 else cond.latents
        ids = torch.cat([latent_ids(rows, cols, 0, self.device), cond.ids.to(self.device)])
        out = tr(
            hidden_states=torch.cat([latents.to(self.device, self.dtype), cond_latents.to(self.device, self.dtype)], 1),
            timestep=(sigma * 1000).to(self.dtype) / 1000,  # as the pipeline: t = 1000 sigma in the model dtype
            guidance=guide,
            pooled_projections=embeds.pooled.to(self.device, self.dtype),
            encoder_hidden_states=embeds.prompt.to(self.device, self.dtype),
            txt_ids=torch.zeros(embeds.prompt.shape[1], 3, device=self.device),
            img_ids=ids,
            return_dict=False,
        )[0]
        return out[:, :length].to(latents.dtype)

    # ---- schedule and sampling -----------------------------------------------------------------------------------
    def sigmas(self, num_steps: int, image_seq_len: int) -> Tensor:
        """Float[num_steps + 1] from 1 to 0 with Flux's dynamic shift for ``image_seq_len`` generated tokens."""
        c = self.config
        mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        return shifted_sigmas(num_steps, mu).to(self.device)

    def initial_noise(
        self, size: Tuple[int, int], batch: int = 1, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Float[B, L, 4C] packed N(0, I) latents, drawn unpacked on the CPU in the model dtype as the pipeline does."""
        f = self.vae_scale_factor
        shape = (batch, self.latent_channels, size[0] // f, size[1] // f)
        z = torch.randn(shape, generator=generator, device="cpu", dtype=self.dtype)
        return pack_latents(z).to(self.device)

    @torch.no_grad()
    def edit(
        self,
        image: Tensor,
        instruction: str,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        seed: int = 0,
    ) -> Tensor:
        """Edit ``image`` (Float[3, H, W] or Float[B, 3, H, W] in [0, 1], H, W multiples of :attr:`multiple_of`)
        with ``instruction``: ``steps`` Euler steps (default ``config.num_steps``) from noise of a CPU generator seeded
        with ``seed``. Returns the edited image(s) of the same shape, float32 in [0, 1]."""
        single = image.ndim == 3
        x = image[None] if single else image
        self._check_image(x)
        steps = steps or self.config.num_steps
        embeds = self.encode_prompt([instruction])
        cond = self.encode_image(x)
        latents = self.initial_noise(cond.size, x.shape[0], torch.Generator("cpu").manual_seed(int(seed)))
        sig = self.sigmas(steps, latents.shape[1])
        for i in range(steps):
            v = self.velocity(latents, cond, sig[i], embeds, guidance)
            latents = (latents.float() + (sig[i + 1] - sig[i]) * v.float()).to(latents.dtype)
        out = self.decode(latents, cond.size)
        return out[0] if single else out

    def policy(self, cond: KontextImage, embeds: KontextPrompt, guidance: Optional[float] = None) -> "KontextPolicy":
        """The velocity field for one condition image and instruction (see ``methods.rl3dedit.sde.Policy``)."""
        return KontextPolicy(self, cond, embeds, self.config.guidance if guidance is None else guidance)


@dataclass
class KontextPolicy:
    """Kontext as a GRPO policy: velocity of the generated grid for a fixed condition grid and instruction."""

    editor: KontextEditor
    """The provider (its transformer carries the LoRA)."""
    cond: KontextImage
    """Condition image, batch 1."""
    embeds: KontextPrompt
    """Instruction encoding, batch 1."""
    guidance: float = 2.5
    """Distilled guidance scale during rollouts (RL3DEdit: unpublished; 2.5 as at inference [I])."""

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        """Shape of one sample's latents: (L, 4C)."""
        return tuple(self.cond.latents.shape[1:])

    @property
    def module(self) -> torch.nn.Module:
        """The network whose LoRA the policy trains (the transformer)."""
        return self.editor.transformer

    def sigmas(self, num_steps: int) -> Tensor:
        return self.editor.sigmas(num_steps, self.latent_shape[0])

    def velocity(self, latents: Tensor, sigma: Union[float, Tensor]) -> Tensor:
        """Float[B, L, 4C] -> Float[B, L, 4C]."""
        return self.editor.velocity(latents, self.cond, sigma, self.embeds, self.guidance)

    def decode(self, latents: Tensor) -> Tensor:
        """Float[B, L, 4C] -> Float[B, 3, H, W] in [0, 1]."""
        return self.editor.decode(latents, self.cond.size)


# ======================================================================================================================
# pretrained FLUX.1-Kontext-dev (+ RL3DEdit)
# ======================================================================================================================
def kontext_how(name: str) -> str:
    return (
        f"FLUX.1-Kontext-dev is gated (non-commercial licence): accept it at https://huggingface.co/{name}, then on a "
        f"machine with network run `huggingface-cli login` and `huggingface-cli download {name}` and copy the HF cache "
        "here; or set FluxKontextConfig.model_name_or_path to a local diffusers folder"
    )


@dataclass
class FluxKontextConfig(KontextEditorConfig):
    """FLUX.1-Kontext-dev (diffusers layout) from the local HF cache or a folder, optionally with the RL3DEdit
    transformer. Untested here (no weights)."""

    _target: Type = field(default_factory=lambda: FluxKontextEditor)
    model_name_or_path: str = KONTEXT_REPO
    """Hub id (resolved in the local HF cache) or a local diffusers folder: VAE, text encoders, tokenizers and, unless
    a transformer file is given, the transformer."""
    transformer_file: Optional[str] = None
    """Transformer in the original BFL single-file format: a local .safetensors path, or ``rl3dedit`` for
    ``exander/RL3DEdit/rl3dedit-flux-kontext.safetensors`` from the HF cache; None = the base Kontext transformer."""
    dtype: str = "bfloat16"
    """Weights and activations (RL3DEdit release: bfloat16 [C])."""
    local_files_only: bool = True
    """Never download (the GPU and test machines have no network); False lets diffusers/transformers fetch files."""
    cache_dir: Optional[Path] = None
    """Hugging Face cache folder; None uses HF_HOME / ~/.cache/huggingface."""
    cpu_offload: bool = True
    """Model CPU offload (RL3DEdit release default: fits in ~24-32 GB VRAM [C]); turn off for GRPO training."""


class FluxKontextEditor(KontextEditor):
    config: FluxKontextConfig

    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        c = self.config
        how = kontext_how(c.model_name_or_path)
        source, local_only = c.model_name_or_path, c.local_files_only
        if looks_like_path(source):
            source = str(require_path(source, weight=f"FLUX.1-Kontext folder {source}", how=how, is_dir=True))
            local_only = True
        where = source if looks_like_path(c.model_name_or_path) else str(c.cache_dir or hf_cache_dir())

        def part(cls: Any, sub: str, dtype_key: Optional[str] = "torch_dtype") -> Any:
            kwargs: Dict[str, Any] = {"subfolder": sub, "local_files_only": local_only, "cache_dir": c.cache_dir}
            if dtype_key:
                kwargs[dtype_key] = self.dtype
            try:
                return cls.from_pretrained(source, **kwargs)
            except (OSError, ValueError) as err:
                raise MissingWeightsError(
                    f"{c.model_name_or_path} ({sub})", where, how, reason=_first_line(err)
                ) from err

        if c.transformer_file:
            path = self._transformer_file()
            try:
                transformer = FluxTransformer2DModel.from_single_file(
                    str(path), config=source, subfolder="transformer", torch_dtype=self.dtype,
                    local_files_only=local_only, cache_dir=c.cache_dir,
                )  # fmt: skip
            except (OSError, ValueError) as err:
                weight = f"transformer config of {c.model_name_or_path}"
                raise MissingWeightsError(weight, where, how, reason=_first_line(err)) from err
        else:
            transformer = part(FluxTransformer2DModel, "transformer")
        modules = {
            "transformer": transformer,
            "vae": part(AutoencoderKL, "vae"),
            "text_encoder": part(CLIPTextModel, "text_encoder", "dtype"),
            "text_encoder_2": part(T5EncoderModel, "text_encoder_2", "dtype"),
        }
        return modules, [part(AutoTokenizer, "tokenizer", None), part(AutoTokenizer, "tokenizer_2", None)]

    def _transformer_file(self) -> Path:
        c = self.config
        how = (
            f"download {RL3DEDIT_FILE} from https://huggingface.co/{RL3DEDIT_REPO} (`huggingface-cli download "
            f"{RL3DEDIT_REPO} {RL3DEDIT_FILE}`) and pass its path as transformer_file"
        )
        if str(c.transformer_file).lower() != "rl3dedit":
            return require_path(c.transformer_file, weight=f"Flux transformer file {c.transformer_file}", how=how)
        from huggingface_hub import hf_hub_download

        try:
            found = hf_hub_download(
                RL3DEDIT_REPO, RL3DEDIT_FILE, cache_dir=c.cache_dir, local_files_only=c.local_files_only
            )
        except Exception as err:  # huggingface_hub raises several offline/not-found error types
            raise MissingWeightsError(f"{RL3DEDIT_REPO}/{RL3DEDIT_FILE}", str(c.cache_dir or hf_cache_dir()), how,
                                      reason=_first_line(err)) from err  # fmt: skip
        return Path(found)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
