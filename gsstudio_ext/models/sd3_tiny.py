"""Tiny random SD3 for tests: the same diffusers/transformers classes from small configs, seeded, with tokenizers
built locally (no hub)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch

from gsstudio_ext.models.rectified_flow import RectifiedFlowConfig, RectifiedFlowModel

# ======================================================================================================================
TINY_WORDS = tuple(
    "a photo of the with and man woman person face hair lips eyes nose mouth head ear cat dog red green blue gold "
    "silver made fire front side back view".split()
)


def tiny_tokenizer(words: Sequence[str], bos: Optional[str], eos: str, pad: str, max_length: int) -> Any:
    """Locally built WordPiece tokenizer: known ``words`` are one token, any other word splits into letters."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [pad, "<unk>", *([bos] if bos else []), eos]  # CLIP: eos id != 2 (its legacy pooling)
    vocab: Dict[str, int] = {}
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    for t in [*specials, *pieces, *("##" + p for p in pieces), *words]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t]
    )
    specials_kw = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **specials_kw)


@dataclass
class TinySD3Config(RectifiedFlowConfig):
    """Random tiny SD3 (2 joint blocks, 2-block VAE, tiny CLIP x2 + T5) with local tokenizers; tests only."""

    _target: Type = field(default_factory=lambda: TinySD3Model)
    max_t5_length: int = 16
    """T5 token sequence length."""
    num_layers: int = 2
    """Joint transformer blocks."""
    heads: int = 2
    """Attention heads."""
    head_dim: int = 8
    """Channels per head."""
    latent_channels: int = 4
    """VAE latent channels (SD3: 16)."""
    vae_channels: Tuple[int, ...] = (8, 8)
    """VAE block widths; len - 1 downsamplings, so 2x here (SD3: 8x), which exercises mask downsampling."""
    clip_dims: Tuple[int, int] = (8, 16)
    """Hidden widths of the CLIP-L and CLIP-G stand-ins."""
    projection_dim: int = 16
    """Projected (pooled) width of each CLIP."""
    t5_dim: int = 32
    """T5 width = joint attention width."""
    words: Tuple[str, ...] = TINY_WORDS
    """Whole-word vocabulary entries; other words split into letter pieces (multi-token words)."""
    seed: int = 0
    """Seed of the random weights."""


class TinySD3Model(RectifiedFlowModel):
    config: TinySD3Config

    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        c = self.config
        clip_tok = tiny_tokenizer(c.words, "<|startoftext|>", "<|endoftext|>", "<pad>", c.max_clip_length)
        t5_tok = tiny_tokenizer(c.words, None, "</s>", "<pad>", c.max_t5_length)
        vocab = len(clip_tok)

        def clip(hidden: int) -> torch.nn.Module:
            cfg = CLIPTextConfig(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=c.max_clip_length, projection_dim=c.projection_dim,
                pad_token_id=clip_tok.pad_token_id, bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
            )  # fmt: skip
            return CLIPTextModelWithProjection(cfg)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            modules = {
                "transformer": SD3Transformer2DModel(
                    sample_size=32, patch_size=2, in_channels=c.latent_channels, num_layers=c.num_layers,
                    attention_head_dim=c.head_dim, num_attention_heads=c.heads, joint_attention_dim=c.t5_dim,
                    caption_projection_dim=c.heads * c.head_dim, pooled_projection_dim=2 * c.projection_dim,
                    out_channels=c.latent_channels, pos_embed_max_size=32,
                ),
                "vae": AutoencoderKL(
                    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(c.vae_channels),
                    up_block_types=("UpDecoderBlock2D",) * len(c.vae_channels), block_out_channels=c.vae_channels,
                    layers_per_block=1, latent_channels=c.latent_channels, norm_num_groups=4, sample_size=64,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                ),
                "text_encoder": clip(c.clip_dims[0]),
                "text_encoder_2": clip(c.clip_dims[1]),
                "text_encoder_3": T5EncoderModel(
                    T5Config(
                        vocab_size=len(t5_tok), d_model=c.t5_dim, d_kv=8, d_ff=2 * c.t5_dim, num_layers=1,
                        num_heads=2, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                        decoder_start_token_id=t5_tok.pad_token_id, dropout_rate=0.0,
                    )
                ),
            }  # fmt: skip
        return modules, [clip_tok, clip_tok, t5_tok]
