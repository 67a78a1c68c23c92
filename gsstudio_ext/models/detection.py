"""Open-vocabulary box detectors: a text phrase in, boxes of the image regions it names out (Grounding DINO).

Backends (pick one config, call ``config.setup(device=...)``):

- :class:`GroundingDinoConfig`: transformers' ``GroundingDinoForObjectDetection`` with released weights
  (``IDEA-Research/grounding-dino-tiny`` by default, the Swin-T model Grounded-SAM uses), resolved in the local
  Hugging Face cache or a local folder; never downloaded unless ``allow_download``.
- :class:`TinyGroundingDinoConfig`: the same model class built from a tiny config with seeded random weights and an
  in-memory tokenizer/processor (no files), for tests. Its boxes are random.

:meth:`Detector.detect` follows Grounded-SAM's post-processing (ReferSplat's pseudo masks, segmentation-methods.md
§3.2): the caption is lower-cased and ends with ".", a query's score is its highest token probability, queries scoring
at or below ``box_threshold`` are dropped, and so are queries none of whose phrase tokens beats ``text_threshold``.
"""

from __future__ import annotations

import string
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type

import numpy as np
import torch
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.hub import from_pretrained, hub_how
from gsstudio_ext.models.provider import Device, LazyProvider

BERT_SPECIAL_IDS: Dict[str, int] = {
    "[PAD]": 0,
    "[UNK]": 100,
    "[CLS]": 101,
    "[SEP]": 102,
    "[MASK]": 103,
    ".": 1012,
    "?": 1029,
}
"""bert-base-uncased ids that Grounding DINO hard-codes as phrase delimiters ([CLS], [SEP], '.', '?')."""


@dataclass
class DetectorConfig(InstantiateConfig):
    """Common settings of every box detector backend (thresholds as Grounded-SAM)."""

    _target: Type = field(default_factory=lambda: Detector)
    box_threshold: float = 0.35
    """Keep a box when its score (highest token probability) exceeds this."""
    text_threshold: float = 0.25
    """...and at least one of the phrase's own tokens (not [CLS]/[SEP]/'.') has a probability above this."""
    max_detections: int = 100
    """At most this many boxes per call (best first)."""


class Detector(LazyProvider):
    """Lazy open-vocabulary detector; ``model`` stays None until the first :meth:`detect` (or :meth:`load`)."""

    config: DetectorConfig

    def __init__(self, config: DetectorConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.processor: Any = None

    @abstractmethod
    def _load(self) -> None:
        """Set ``self.processor`` (a GroundingDinoProcessor) and ``self.model`` on ``self.device``."""

    def detect(self, image: np.ndarray, text: str) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes of the regions that ``text`` names in ``image``.

        Args:
            image: UInt8[H, W, 3] RGB array.
            text: a phrase or referring expression.

        Returns:
            boxes: Float32[K, 4] (x0, y0, x1, y1) in pixels, inside [0, W] x [0, H]; scores: Float32[K] in (0, 1],
            both sorted by descending score. K = 0 when nothing passes the thresholds.
        """
        image = _check_image(image)
        caption = grounding_caption(text)
        self.load()
        inputs = self.processor(
            images=image, text=caption, return_tensors="pt", truncation=True, max_length=self.model.config.max_text_len
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
        return self._postprocess(out.logits[0], out.pred_boxes[0], inputs["input_ids"][0], image.shape[:2])

    def _postprocess(self, logits: Tensor, boxes: Tensor, input_ids: Tensor, hw: Tuple[int, int]):
        c = self.config
        length = int(input_ids.shape[0])
        probs = logits[:, :length].float().sigmoid().cpu()  # [Q, L]; positions past the text are -inf anyway
        ids = input_ids.cpu()
        phrase = ~torch.isin(ids, torch.tensor(self._delimiter_ids(), dtype=ids.dtype))
        scores = probs.max(dim=1).values
        phrase_best = probs[:, phrase].max(dim=1).values if bool(phrase.any()) else torch.zeros_like(scores)
        h, w = int(hw[0]), int(hw[1])
        cx, cy, bw, bh = boxes.float().cpu().unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        xyxy = xyxy * torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        nonempty = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        keep = (scores > c.box_threshold) & (phrase_best > c.text_threshold) & nonempty
        scores, xyxy = scores[keep], xyxy[keep]
        order = torch.argsort(-scores, stable=True)[: max(0, c.max_detections)]
        return xyxy[order].numpy().astype(np.float32), scores[order].numpy().astype(np.float32)

    def _delimiter_ids(self) -> list:
        """Token ids that are not part of a phrase: the tokenizer's special tokens plus '.' and '?'."""
        tok = self.processor.tokenizer
        extra = tok.convert_tokens_to_ids([".", "?"])
        return sorted({int(i) for i in [*tok.all_special_ids, *extra] if i is not None})


def grounding_caption(text: str) -> str:
    """Grounding DINO's caption form: stripped, lower case, ending with '.' (as Grounded-SAM feeds it)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty detection text {text!r}: give a phrase naming what to detect")
    caption = text.strip().lower()
    return caption if caption.endswith(".") else caption + "."


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an RGB array of shape [H, W, 3], got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got {image.dtype}")
    return np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # torch warns on read-only arrays


# ======================================================================================================================
# released Grounding DINO weights
# ======================================================================================================================
@dataclass
class GroundingDinoConfig(DetectorConfig):
    """Grounding DINO through transformers (Grounded-SAM / ReferSplat pseudo masks: Swin-T)."""

    _target: Type = field(default_factory=lambda: GroundingDinoDetector)
    model_name_or_path: str = "IDEA-Research/grounding-dino-tiny"
    """Hub id (resolved in the local HF cache) or a local folder with config, weights and processor files."""
    allow_download: bool = False
    """Let transformers download a missing hub model (off by default: the GPU and test machines have no network)."""
    cache_dir: Optional[Path] = None
    """Hugging Face cache folder; None uses HF_HOME / ~/.cache/huggingface."""


class GroundingDinoDetector(Detector):
    config: GroundingDinoConfig

    def _from_pretrained(self, cls: Any) -> Any:
        c = self.config
        how = hub_how(c.model_name_or_path, "GroundingDinoConfig")
        return from_pretrained(cls, c.model_name_or_path, c.allow_download, c.cache_dir, how)

    def _load(self) -> None:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        self.processor = self._from_pretrained(AutoProcessor)
        self.model = self._from_pretrained(GroundingDinoForObjectDetection).to(self.device)


# ======================================================================================================================
# tiny random Grounding DINO (tests)
# ======================================================================================================================
def tiny_bert_tokenizer(max_length: int = 128) -> Any:
    """A BertTokenizerFast built in memory: characters as WordPiece pieces, BERT's special ids (no files).

    [CLS], [SEP], '.' and '?' get bert-base-uncased's ids, which Grounding DINO uses to split phrases.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    chars = string.ascii_lowercase + string.digits
    pieces = [*chars, *(f"##{c}" for c in chars), *(p for p in string.punctuation if p not in ".?")]
    size = max(BERT_SPECIAL_IDS.values()) + 1
    tokens: list = [None] * size
    for tok, idx in BERT_SPECIAL_IDS.items():
        tokens[idx] = tok
    free = [i for i in range(size) if tokens[i] is None]
    for idx, piece in zip(free, pieces):
        tokens[idx] = piece
    tokens = [t if t is not None else f"[unused{i}]" for i, t in enumerate(tokens)]
    tokens += pieces[len(free) :]
    wordpiece = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = BERT_SPECIAL_IDS["[CLS]"], BERT_SPECIAL_IDS["[SEP]"]
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


@dataclass
class TinyGroundingDinoConfig(DetectorConfig):
    """A real GroundingDinoForObjectDetection with tiny sizes, seeded random weights and an in-memory processor."""

    _target: Type = field(default_factory=lambda: TinyGroundingDinoDetector)
    image_size: int = 128
    """Images are resized so that their long side is this (>= 128: the coarsest feature map must exceed 1x1)."""
    d_model: int = 32
    """Transformer width (multiple of 32: GroupNorm groups)."""
    num_queries: int = 20
    """Detection slots (boxes before thresholds)."""
    backbone_dim: int = 16
    """Swin embedding width."""
    text_dim: int = 32
    """BERT text encoder width."""
    max_text_len: int = 128
    """Longest caption in tokens (characters count as tokens here)."""
    seed: int = 0
    """Seed of the random weights."""


class TinyGroundingDinoDetector(Detector):
    config: TinyGroundingDinoConfig

    def _load(self) -> None:
        from transformers import (
            BertConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
            SwinConfig,
        )
        from transformers import GroundingDinoConfig as HFGroundingDinoConfig

        c = self.config
        if c.image_size < 128 or c.d_model % 32:
            raise ValueError("TinyGroundingDinoConfig needs image_size >= 128 and d_model a multiple of 32")
        tokenizer = tiny_bert_tokenizer(c.max_text_len)
        backbone = SwinConfig(
            image_size=c.image_size,
            patch_size=4,
            embed_dim=c.backbone_dim,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_indices=[2, 3, 4],
        )
        text = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=c.text_dim,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * c.text_dim,
            max_position_embeddings=c.max_text_len,
        )
        config = HFGroundingDinoConfig(
            backbone_config=backbone,
            text_config=text,
            num_queries=c.num_queries,
            d_model=c.d_model,
            encoder_layers=1,
            decoder_layers=2,  # transformers ties the box heads of decoder layers 1.. to layer 0: needs >= 2
            encoder_ffn_dim=2 * c.d_model,
            decoder_ffn_dim=2 * c.d_model,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_n_points=2,
            decoder_n_points=2,
            max_text_len=c.max_text_len,
            disable_custom_kernels=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = GroundingDinoForObjectDetection(config)
        images = GroundingDinoImageProcessor(size={"shortest_edge": c.image_size, "longest_edge": c.image_size})
        self.processor = GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer)
        self.model = model.to(self.device)
