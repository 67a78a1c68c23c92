"""Tiny random FLUX.1-Kontext for tests: the same diffusers/transformers classes from small configs, seeded, with
tokenizers built locally (no hub). One double and one single block, 2 heads x 16, a 2x VAE with 16 latent channels
(so packed tokens are 64 wide as in FLUX), and the Kontext buckets scaled by 1/32 (32 x 32 px for a square grid)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Type

import torch

from gsstudio_ext.models.flux_kontext import KontextEditor, KontextEditorConfig
from gsstudio_ext.models.sd3_tiny import TINY_WORDS, tiny_tokenizer


@dataclass
class TinyFluxKontextConfig(KontextEditorConfig):
    """Random tiny FLUX.1-Kontext (1 + 1 blocks, 2-block VAE, tiny CLIP + T5) with local tokenizers; tests only."""

    _target: Type = field(default_factory=lambda: TinyFluxKontextEditor)
    max_sequence_length: int = 16
    """T5 token sequence length."""
    bucket_scale: float = 1.0 / 32.0
    """Kontext buckets times 1/32: (20, 48) ... (32, 32) ... (48, 20) px with the 4-px multiple of this VAE."""
    num_layers: int = 1
    """Double-stream (joint) blocks."""
    num_single_layers: int = 1
    """Single-stream blocks."""
    heads: int = 2
    """Attention heads."""
    head_dim: int = 16
    """Channels per head (= sum of the RoPE axes)."""
    axes_dims_rope: Tuple[int, int, int] = (4, 4, 8)
    """RoPE channels for the (index, row, column) token ids."""
    latent_channels: int = 16
    """VAE latent channels (FLUX: 16), so a packed token has 64 channels."""
    vae_channels: Tuple[int, ...] = (8, 8)
    """VAE block widths; len - 1 downsamplings, so 2x here (FLUX: 8x)."""
    text_dim: int = 32
    """Width of the CLIP (pooled) and T5 (sequence) stand-ins."""
    seed: int = 0
    """Seed of the random weights."""


class TinyFluxKontextEditor(KontextEditor):
    config: TinyFluxKontextConfig

    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        c = self.config
        clip_tok = tiny_tokenizer(TINY_WORDS, "<|startoftext|>", "<|endoftext|>", "<pad>", 77)
        t5_tok = tiny_tokenizer(TINY_WORDS, None, "</s>", "<pad>", c.max_sequence_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            modules = {
                "transformer": FluxTransformer2DModel(
                    patch_size=1, in_channels=4 * c.latent_channels, num_layers=c.num_layers,
                    num_single_layers=c.num_single_layers, attention_head_dim=c.head_dim,
                    num_attention_heads=c.heads, joint_attention_dim=c.text_dim, pooled_projection_dim=c.text_dim,
                    guidance_embeds=True, axes_dims_rope=c.axes_dims_rope,
                ),
                "vae": AutoencoderKL(
                    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(c.vae_channels),
                    up_block_types=("UpDecoderBlock2D",) * len(c.vae_channels), block_out_channels=c.vae_channels,
                    layers_per_block=1, latent_channels=c.latent_channels, norm_num_groups=4, sample_size=32,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                ),  # FLUX's VAE scaling/shift factors
                "text_encoder": CLIPTextModel(
                    CLIPTextConfig(
                        vocab_size=len(clip_tok), hidden_size=c.text_dim, intermediate_size=2 * c.text_dim,
                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                        pad_token_id=clip_tok.pad_token_id, bos_token_id=clip_tok.bos_token_id,
                        eos_token_id=clip_tok.eos_token_id,
                    )
                ),
                "text_encoder_2": T5EncoderModel(
                    T5Config(
                        vocab_size=len(t5_tok), d_model=c.text_dim, d_kv=8, d_ff=2 * c.text_dim, num_layers=1,
                        num_heads=2, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                        decoder_start_token_id=t5_tok.pad_token_id, dropout_rate=0.0,
                    )
                ),
            }  # fmt: skip
        return modules, [clip_tok, t5_tok]
