"""Stable Diffusion 3 (rectified-flow MMDiT) provider: prompts, VAE, velocity, schedule and attention capture.

Backends: :class:`SD3Config` (``stabilityai/stable-diffusion-3-medium-diffusers`` from the local HF cache or a folder;
gated, never available on the build machines) and :class:`TinySD3Config` (the same diffusers/transformers classes
built from tiny configs with seeded random weights and locally built tokenizers, for tests; in
:mod:`gsstudio_ext.models.sd3_tiny`).

Conventions (SD3, ``FlowMatchEulerDiscreteScheduler``): ``z_sigma = (1 - sigma) z0 + sigma eps``; the transformer
predicts ``v = eps - z0``, so an Euler step is ``z += v (sigma_next - sigma)``. The training schedule has 1000
entries; index 0 is the most noisy (sigma 1) and index 999 the least.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.errors import MissingWeightsError, hf_cache_dir, looks_like_path, require_path
from gsstudio_ext.models.provider import Device, LazyProvider
from gsstudio_ext.models.sd3_attention import AttentionStore, JointAttentionCaptureProcessor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PromptEmbeds:
    """Encoded prompts: joint text sequence (77 CLIP tokens, then T5), pooled CLIP vector, CLIP token strings."""

    prompt: Tensor
    """Float[B, T, D] with T = 77 + T5 length and D = the T5 width (CLIP features zero padded)."""
    pooled: Tensor
    """Float[B, Dp]: CLIP-L and CLIP-G projected text embeddings, concatenated."""
    tokens: List[List[str]]
    """Per prompt, the CLIP-L token strings of the first 77 rows of ``prompt`` (padding included)."""

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def expand(self, batch: int) -> "PromptEmbeds":
        """Repeat a single prompt to ``batch`` rows (no-op when the batch already matches)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} prompts to a batch of {batch}")
        return PromptEmbeds(self.prompt.expand(batch, -1, -1), self.pooled.expand(batch, -1), self.tokens * batch)

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch (e.g. [uncond, cond] for classifier-free guidance)."""
        return PromptEmbeds(
            torch.cat([e.prompt for e in items]),
            torch.cat([e.pooled for e in items]),
            [t for e in items for t in e.tokens],
        )


# ======================================================================================================================
# provider
# ======================================================================================================================
@dataclass
class RectifiedFlowConfig(InstantiateConfig):
    """Settings shared by the SD3 backends."""

    _target: Type = field(default_factory=lambda: RectifiedFlowModel)
    shift: float = 3.0
    """Timestep shift of the flow-matching schedule (SD3-medium's scheduler config: 3.0)."""
    num_train_timesteps: int = 1000
    """Entries of the training schedule (SD3: 1000)."""
    dtype: str = "float32"
    """Weights and activations: float32, float16 or bfloat16."""
    max_clip_length: int = 77
    """CLIP token sequence length (SD3: 77)."""
    max_t5_length: int = 256
    """T5 token sequence length (SD3 pipeline default: 256)."""
    cache_size: int = 256
    """Encoded prompts kept in memory (least recently used evicted)."""


class RectifiedFlowModel(LazyProvider):
    """SD3 components behind a small API; ``model`` is a ModuleDict (transformer, vae, text_encoder[_2, _3])."""

    config: RectifiedFlowConfig

    def __init__(self, config: RectifiedFlowConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.tokenizers: List[Any] = []
        self._prompts: "OrderedDict[str, Tuple[Tensor, Tensor, List[str]]]" = OrderedDict()
        self._capture: Optional[AttentionStore] = None
        self._train_sigmas: Optional[Tensor] = None

    @abstractmethod
    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        """Return (components by name, [clip_l, clip_g, t5] tokenizers; t5 may be None without a T5 encoder)."""

    def _load(self) -> None:
        modules, self.tokenizers = self._build()
        for m in modules.values():
            m.to(self.device)
            if next(m.parameters()).dtype != self.dtype:  # pretrained parts already load in self.dtype
                m.to(self.dtype)
        self.model = torch.nn.ModuleDict(modules)

    def to(self, device: Device) -> "RectifiedFlowModel":
        """Move the components (if loaded) and the cached prompt encodings to ``device``."""
        super().to(device)
        for key, (prompt, pooled, tokens) in self._prompts.items():
            self._prompts[key] = (prompt.to(self.device), pooled.to(self.device), tokens)
        return self

    # ---- properties ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.config.dtype]

    @property
    def transformer(self) -> Any:
        return self.load().model["transformer"]

    @property
    def vae(self) -> Any:
        return self.load().model["vae"]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (SD3: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    # ---- prompts -------------------------------------------------------------------------------------------------
    def encode_prompt(self, texts: Sequence[str]) -> PromptEmbeds:
        """Encode ``texts`` (cached by string); works after :meth:`release_text_encoders` for cached prompts only."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            self.load()
            missing = [t for t in dict.fromkeys(texts) if t not in self._prompts]
            if missing:
                if "text_encoder" not in self.model:
                    raise RuntimeError(f"text encoders were released; encode {missing!r} before release_text_encoders")
                with torch.no_grad():
                    prompt, pooled, tokens = self._encode_batch(missing)
                for i, t in enumerate(missing):
                    self._prompts[t] = (prompt[i], pooled[i], tokens[i])
            found = []
            for t in texts:
                self._prompts.move_to_end(t)
                found.append(self._prompts[t])
            while len(self._prompts) > max(self.config.cache_size, len(texts)):
                self._prompts.popitem(last=False)
        prompts, pooled, tokens = zip(*found)
        return PromptEmbeds(torch.stack(prompts), torch.stack(pooled), list(tokens))

    def empty_prompt(self) -> PromptEmbeds:
        """The unconditional embedding (empty string), cached."""
        return self.encode_prompt([""])

    def release_text_encoders(self) -> None:
        """Drop the three text encoders (SD3: ~10 GB with T5); cached prompts stay usable, tokenizers are kept."""
        with self._lock:
            if self.model is not None:
                for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                    if name in self.model:
                        del self.model[name]

    def _encode_batch(self, texts: List[str]) -> Tuple[Tensor, Tensor, List[List[str]]]:
        c = self.config
        hidden, pooled, ids0 = [], [], None
        for name, tok in (("text_encoder", self.tokenizers[0]), ("text_encoder_2", self.tokenizers[1])):
            ids = tok(texts, padding="max_length", max_length=c.max_clip_length, truncation=True, return_tensors="pt")
            ids = ids["input_ids"].to(self.device)
            ids0 = ids if ids0 is None else ids0
            out = self.model[name](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SD3
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if "text_encoder_3" in self.model:
            t5_tok = self.tokenizers[2](
                texts, padding="max_length", max_length=c.max_t5_length, truncation=True, return_tensors="pt"
            )
            t5 = self.model["text_encoder_3"](t5_tok["input_ids"].to(self.device))[0]
        else:  # SD3 without T5: zeros of the joint width
            width = self.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(texts), c.max_t5_length, width, device=self.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        tokens = [self.tokenizers[0].convert_ids_to_tokens(row.tolist()) for row in ids0]
        prompt = torch.cat([clip, t5.to(clip.dtype)], dim=1).to(self.dtype)
        return prompt, torch.cat(pooled, dim=-1).to(self.dtype), tokens

    def word_token_positions(self, prompt: str, words: Sequence[str], start: int = 0) -> List[int]:
        """Rows of the CLIP sequence (BOS = row 0) covering ``words``, found in order as whole words at or after char
        ``start``, from tokenizer offsets, so a word split into several tokens gives all of them.

        Raises:
            ValueError: a word is not in the prompt, or its tokens were truncated away.
        """
        self.load()
        spans, pos = [], start
        for w in words:
            m = re.compile(rf"(?<!\w){re.escape(w.strip())}(?!\w)", re.IGNORECASE).search(prompt, pos)
            if m is None:
                raise ValueError(f"word {w!r} not found in prompt {prompt!r} after character {start}")
            spans.append(m.span())
            pos = m.end()
        enc = self.tokenizers[0](
            prompt, truncation=True, max_length=self.config.max_clip_length, return_offsets_mapping=True
        )
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        rows: Set[int] = set()
        for a, b in spans:
            hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
            if not hits:
                raise ValueError(f"{prompt[a:b]!r} lies beyond the {self.config.max_clip_length} CLIP tokens")
            rows.update(hits)
        return sorted(rows)

    # ---- VAE -----------------------------------------------------------------------------------------------------
    def encode_image(self, x: Tensor) -> Tensor:
        """x: Float[B, 3, H, W] in [0, 1] -> z: Float[B, C, H/f, W/f] = (mean latent - shift) * scale.
        Differentiable w.r.t. ``x`` (weights are frozen)."""
        vae = self.vae
        div = self.vae_scale_factor * self.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % div or x.shape[3] % div:
            raise ValueError(f"image must be [B, 3, H, W] with H, W multiples of {div}, got {tuple(x.shape)}")
        z = vae.encode(2.0 * x.to(self.device, self.dtype) - 1.0).latent_dist.mean
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """z: Float[B, C, h, w] -> x: Float[B, 3, h f, w f] in [0, 1]."""
        vae = self.vae
        z = z.to(self.device, self.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- transformer ---------------------------------------------------------------------------------------------
    def velocity(self, z: Tensor, sigma: Union[float, Tensor], embeds: PromptEmbeds) -> Tensor:
        """v = eps - z0 predicted at noise level ``sigma`` (scalar or Float[B]); z: Float[B, C, h, w]; embeds of
        batch 1 or B. Returns Float[B, C, h, w] in ``z``'s dtype."""
        tr = self.transformer
        batch = z.shape[0]
        sigma = torch.as_tensor(sigma, device=self.device, dtype=torch.float32).reshape(-1).expand(batch)
        embeds = embeds.expand(batch)
        if self._capture is not None:
            p = self.patch_size
            self._capture.reset((z.shape[-2] // p, z.shape[-1] // p))
        out = tr(
            hidden_states=z.to(self.device, self.dtype),
            encoder_hidden_states=embeds.prompt.to(self.device, self.dtype),
            pooled_projections=embeds.pooled.to(self.device, self.dtype),
            timestep=sigma * self.config.num_train_timesteps,  # float32, as the SD3 pipeline passes it
            return_dict=False,
        )[0]
        return out.to(z.dtype)

    @contextmanager
    def capture_attention(
        self, token_rows: Sequence[int], blocks: Optional[Sequence[int]] = None
    ) -> Iterator[AttentionStore]:
        """Install capturing processors on every joint block (``blocks``: which ones record; None = all) and yield
        the store; the previous processors are restored on exit. ``store.maps``: Float[R, h_tokens, w_tokens]."""
        tr = self.transformer
        n = len(tr.transformer_blocks)
        chosen = set(range(n)) if blocks is None else {int(b) % n for b in blocks}
        store = AttentionStore(token_rows, chosen)
        previous = [blk.attn.processor for blk in tr.transformer_blocks]
        try:
            for i, blk in enumerate(tr.transformer_blocks):
                blk.attn.set_processor(JointAttentionCaptureProcessor(i, store if i in chosen else None))
            self._capture = store
            yield store
        finally:
            self._capture = None
            for blk, proc in zip(tr.transformer_blocks, previous):
                blk.attn.set_processor(proc)

    # ---- schedule ------------------------------------------------------------------------------------------------
    def _scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.config.num_train_timesteps, shift=self.config.shift
        )

    def sigma_at(self, index: Union[int, Tensor]) -> Tensor:
        """Sigma of training-schedule entry ``index`` (0 = most noisy, sigma 1); needs no weights."""
        if self._train_sigmas is None:
            self._train_sigmas = torch.as_tensor(self._scheduler().sigmas, dtype=torch.float32)
        idx = torch.as_tensor(index).long().cpu().clamp(0, self.config.num_train_timesteps - 1)
        return self._train_sigmas[idx].to(self.device)

    def sigmas(self, num_steps: int) -> Tensor:
        """Float[num_steps + 1] sampling sigmas from 1 down to 0 (SD3 pipeline schedule)."""
        scheduler = self._scheduler()
        scheduler.set_timesteps(num_steps)
        return torch.as_tensor(scheduler.sigmas, dtype=torch.float32).to(self.device)


# ======================================================================================================================
# pretrained SD3
# ======================================================================================================================
def sd3_how(name: str) -> str:
    return (
        f"SD3 is gated: accept the Stability AI community licence at https://huggingface.co/{name}, then on a machine "
        f"with network run `huggingface-cli login` and `huggingface-cli download {name}` and copy the HF cache here; "
        "or set SD3Config.model_name_or_path to a local diffusers folder; or set SD3Config.allow_download=True"
    )


@dataclass
class SD3Config(RectifiedFlowConfig):
    """Stable Diffusion 3 medium (diffusers layout) from the local HF cache or a folder. Untested here (no weights)."""

    _target: Type = field(default_factory=lambda: SD3Model)
    model_name_or_path: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    """Hub id (resolved in the local HF cache) or a local folder in the diffusers layout."""
    dtype: str = "float16"
    """Weights and activations: float16 (RoMaP), bfloat16 or float32."""
    allow_download: bool = False
    """Let diffusers/transformers download missing files (off: the GPU and test machines have no network)."""
    cache_dir: Optional[Path] = None
    """Hugging Face cache folder; None uses HF_HOME / ~/.cache/huggingface."""
    use_t5: bool = True
    """Load T5-XXL (4.7B); without it the T5 rows are zeros, as SD3 allows ([I] memory option)."""


class SD3Model(RectifiedFlowModel):
    config: SD3Config

    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        c = self.config
        how = sd3_how(c.model_name_or_path)
        source, local_only = c.model_name_or_path, not c.allow_download
        if looks_like_path(source):
            source = str(require_path(source, weight=f"SD3 diffusers folder {source}", how=how, is_dir=True))
            local_only = True

        def part(cls: Any, sub: str, dtype_key: Optional[str] = "torch_dtype") -> Any:
            kwargs = {"subfolder": sub, "local_files_only": local_only, "cache_dir": c.cache_dir}
            if dtype_key:
                kwargs[dtype_key] = self.dtype
            try:
                return cls.from_pretrained(source, **kwargs)
            except (OSError, ValueError) as err:
                where = source if looks_like_path(c.model_name_or_path) else str(c.cache_dir or hf_cache_dir())
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise MissingWeightsError(f"{c.model_name_or_path} ({sub})", where, how, reason=reason) from err

        modules = {
            "transformer": part(SD3Transformer2DModel, "transformer"),
            "vae": part(AutoencoderKL, "vae"),
            "text_encoder": part(CLIPTextModelWithProjection, "text_encoder", "dtype"),
            "text_encoder_2": part(CLIPTextModelWithProjection, "text_encoder_2", "dtype"),
        }
        tokenizers = [part(CLIPTokenizer, "tokenizer", None), part(CLIPTokenizer, "tokenizer_2", None), None]
        if c.use_t5:
            modules["text_encoder_3"] = part(T5EncoderModel, "text_encoder_3", "dtype")
            tokenizers[2] = part(T5Tokenizer, "tokenizer_3", None)
        return modules, tokenizers
