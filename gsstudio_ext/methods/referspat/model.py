"""ReferSplat: referring segmentation of a trained, frozen Gaussian scene (segmentation-methods.md §3).

Every Gaussian gets a learnable referring feature (N, 16). For the S expressions of a view, the position-aware
cross-attention (:mod:`.attention`) gives each Gaussian one response per expression; the responses are rendered as
S channels of ONE rasterization (next to RGB) and trained with BCE against the expressions' target masks plus the
Gaussian-text contrastive term. Differences from the official code (spec §3.8): one render and one backward per view
for all its expressions, word embeddings encoded once and cached, attention restricted to the Gaussians in the
view's frustum (``attention_scope``), every expression scored in ns-eval.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Dict, Iterator, List, Literal, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.viewer.viewer_elements import ViewerControl
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.contributions import contributions_and_footprint
from gsstudio_ext.core.frustum import in_frustum
from gsstudio_ext.data.expression_table import ExpressionTable, target_masks
from gsstudio_ext.methods.base.frozen_strategy import FrozenStrategy
from gsstudio_ext.methods.base.model import FeatureSplatfactoModel, FeatureSplatfactoModelConfig, View
from gsstudio_ext.methods.base.queries import QueryConfig, QueryState
from gsstudio_ext.methods.base.scene_export import export_selection
from gsstudio_ext.methods.base.trained_scene import GEOMETRY_KEYS, load_trained_scene, scene_params
from gsstudio_ext.methods.referspat.attention import PCMI, GaussianTerms, PCMIConfig, PCMIOutput
from gsstudio_ext.methods.referspat.losses import gtcl_loss, rho_at, sentence_embeddings
from gsstudio_ext.models.text import BertTextConfig, MiniLMTextConfig, TextEncoder, TinyTextConfig
from gsstudio_ext.viewer.model_actions import model_actions
from gsstudio_ext.viewer.query_panel import QueryPanel

WordEncoderConfig = Union[
    Annotated[MiniLMTextConfig, tyro.conf.subcommand("minilm")],
    Annotated[BertTextConfig, tyro.conf.subcommand("bert")],
    Annotated[TinyTextConfig, tyro.conf.subcommand("tiny")],
]
"""Text encoders that give per-word embeddings, as ``--pipeline.model.text-encoder:{minilm,bert,tiny}``."""


class Words(NamedTuple):
    """Word embeddings of S expressions, as the attention takes them."""

    tokens: Tensor
    """[S, L, Dt] token embeddings, zero padded."""
    mask: Tensor
    """[S, L] bool, True on real words."""


class LiveQuery(NamedTuple):
    """The expression behind the live selection, rendered in every view with its own threshold."""

    text: str
    threshold: float


@dataclass
class ReferModelConfig(FeatureSplatfactoModelConfig):
    """ReferSplat on a trained scene, with the official hyper-parameters."""

    _target: Type = field(default_factory=lambda: ReferModel)
    scene: Optional[Path] = None
    """The trained scene to segment: a splatfacto / gsstudio run (its config.yml, folder or step-*.ckpt) or a 3DGS
    .ply, in the frame of this dataset's dataparser. Its geometry and colours stay frozen."""
    text_encoder: WordEncoderConfig = field(default_factory=MiniLMTextConfig)
    """Word embeddings: the offline MiniLM (default) or ReferSplat's bert-large-uncased (hub weights)."""
    attention: PCMIConfig = field(default_factory=PCMIConfig)
    """Sizes of the text, Gaussian and position MLPs and of the cross-attention (word_dim follows the encoder)."""
    attention_scope: Literal["visible", "all"] = "visible"
    """Gaussians a view's attention runs over: those in the view's frustum, or all of them (the official code)."""
    gtcl_weight: float = 0.1
    """Weight of the Gaussian-text contrastive term."""
    gtcl_temperature: float = 0.1
    """Temperature of the contrastive logits."""
    rho_start: float = 0.1
    """Fraction of top-responding Gaussians pooled by the contrastive term at the start."""
    rho_factor: float = 0.6
    """rho is multiplied by this every ``rho_every`` expressions trained on."""
    rho_every: int = 2000
    """Expressions (the official code's steps: one per view and expression) between rho decays."""
    rho_floor: float = 0.005
    """Smallest rho."""
    held_out_kinds: Tuple[str, ...] = ()
    """Expression kinds not trained on (e.g. paraphrase left_right front_behind), to measure generalisation."""
    num_downscales: int = 0
    """Training renders at full resolution from the first step (the scene is already trained)."""
    min_opacity: float = 0.1
    """Gaussians below this opacity are never selected by a query."""
    selection_votes: int = 16
    """Training views (evenly spread) whose rendered masks vote on a query's 3D selection: a Gaussian stays selected
    when at least half of its blend weight in them falls inside the masks (spec §3.8: lifting masks through blend
    weights). Removes Gaussians whose own response passes but which the rendered masks disown; 0 = responses only."""
    query: QueryConfig = field(default_factory=lambda: QueryConfig(threshold=0.5))
    """Expression shown in renders (ns-render reproduces it); threshold = probability sigmoid(response) to select."""


class ReferModel(FeatureSplatfactoModel):
    """Referring segmentation of a frozen scene (referspat-ext)."""

    config: ReferModelConfig
    frozen_params = GEOMETRY_KEYS
    query_outputs = {"selection": "referring_mask", "relevancy": "referring_probability"}
    """gs-query's output names -> this model's."""
    query_state: QueryState
    _scene_problem: Optional[str] = None
    _words: Optional[Words] = None
    vote_cameras: Optional[Cameras] = None
    """Training cameras for :meth:`mask_votes` (the pipeline sets them)."""
    _terms: Optional[Tuple[tuple, GaussianTerms]] = None
    _attended: Optional[Tuple[PCMIOutput, Tensor]] = None
    """The last training render's attention output and word mask (for the contrastive term)."""

    # ------------------------------------------------------------------ set-up

    def populate_modules(self) -> None:
        self._scene, self._scene_problem = load_trained_scene(self.config.scene)
        if self._scene is not None:
            self.config.sh_degree = self._scene.sh_degree
        super().populate_modules()
        self.encoder: TextEncoder = self.config.text_encoder.setup(device="cpu")
        self.attention = PCMI(replace(self.config.attention, word_dim=self.encoder.token_dim))
        metadata = self.kwargs.get("metadata") or {}
        self.expressions = ExpressionTable.from_records(metadata.get("expressions") or [])
        self._expression_words: Optional[Words] = None
        self._expressions_trained = 0
        self.query_state = QueryState()
        self._config_query_applied = False
        self.viewer_control = ViewerControl()
        query = self.config.query
        self.query_panel = QueryPanel(
            model_actions(self, export=lambda path: export_selection(self, path)), self.viewer_control,
            text=query.text, negatives=", ".join(query.negatives), threshold=self.threshold(), mode=query.mode,
        )  # fmt: skip

    def init_gaussian_params(self, points: Tensor, colors: Optional[Tensor], generator: torch.Generator):
        params = scene_params(self._scene, self.config.sh_degree)
        self._scene = None  # the parameters hold it now
        params["referring"] = torch.zeros(params["means"].shape[0], self.config.attention.feature_dim)
        return params

    def make_strategy(self) -> FrozenStrategy:
        return FrozenStrategy()

    def active_sh_degree(self) -> int:
        return self.config.sh_degree  # a trained scene: every degree from the start

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        result = super().load_state_dict(state_dict, **kwargs)
        coefficients = self.gauss_params["features_rest"].shape[1] + 1
        self.config.sh_degree = round(math.sqrt(coefficients)) - 1  # the checkpoint's, whatever the scene file holds
        return result

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        """The referring features and the attention's weights (geometry and colours stay frozen)."""
        if self._scene_problem is not None and self.num_points == 0:
            raise ValueError(
                f"referspat-ext segments a trained scene, but {self._scene_problem}: train one first (e.g. ns-train "
                "gsstudio-splatfacto --data DATA), then pass it with --pipeline.model.scene "
                "outputs/.../config.yml (or a step-*.ckpt, or a 3DGS .ply in this dataparser's frame)"
            )
        if len(self.expressions) == 0:
            raise ValueError(
                "the dataset has no referring expressions: referspat-ext trains on sidecars/expressions.json with "
                "target masks (gs-synth writes them; gs-refer-masks makes pseudo masks for real scenes)"
            )
        groups = self.get_gaussian_param_groups()
        groups["referring_fields"] = list(self.attention.parameters())
        return groups

    # ------------------------------------------------------------------ text

    def _encoder(self) -> TextEncoder:
        if self.encoder.device != self.device:
            self.encoder.to(self.device)
        return self.encoder

    def text_words(self, texts: Sequence[str]) -> Words:
        """Word embeddings of ``texts`` (cached by the encoder); ValueError for an empty text."""
        tokens, mask = self._encoder().encode_tokens(list(texts))
        return Words(tokens, mask.to(tokens.device))

    def expression_words(self, ids: Tensor) -> Words:
        """Word embeddings of dataset expressions by id (all encoded once, on first use)."""
        if self._expression_words is None or self._expression_words.tokens.device != self.device:
            self._expression_words = self.text_words(self.expressions.texts)
        ids = ids.to(self.device)
        words = Words(self._expression_words.tokens.index_select(0, ids), self._expression_words.mask[ids])
        length = max(int(words.mask.sum(1).max()), 1) if ids.numel() else 1
        return Words(words.tokens[:, :length], words.mask[:, :length])

    @contextlib.contextmanager
    def rendering(self, words: Words) -> Iterator[None]:
        """Render ``words`` as the ``referring_logit`` channels (one per expression) inside this block."""
        previous, self._words = self._words, words
        try:
            yield
        finally:
            self._words = previous

    # ------------------------------------------------------------------ responses

    def gaussian_terms(self) -> GaussianTerms:
        """The attention's word-independent terms of every Gaussian; cached while no gradient is taken and the
        weights are unchanged (queries, viewer renders)."""
        features, xyz = self.gauss_params["referring"], self.gauss_params["means"]
        if torch.is_grad_enabled():
            return self.attention.gaussian_terms(features, xyz)
        key = (id(features), features._version, tuple(p._version for p in self.attention.parameters()))
        if self._terms is None or self._terms[0] != key:
            self._terms = (key, self.attention.gaussian_terms(features, xyz))
        return self._terms[1]

    def responses(self, words: Words) -> PCMIOutput:
        """Attention output of all Gaussians for the expressions ``words`` (no view: a 3D query)."""
        return self.attention.attend(self.gaussian_terms(), words.tokens, words.mask)

    def _view_responses(self, crop_ids: Optional[Tensor], view: View, words: Words) -> Tensor:
        """Responses [n, S] of the rendered Gaussians (``crop_ids`` of all) in ``view``, zero outside the attention
        scope. Training runs the attention on the scope's Gaussians only and keeps its output for the contrastive
        term; without gradients the cached terms of all Gaussians are used, the scope masking the word placement."""
        visible = None
        if self.config.attention_scope == "visible":
            means, scales = self.means, torch.exp(self.gauss_params["scales"])
            if crop_ids is not None:
                means, scales = means[crop_ids], scales[crop_ids]
            visible = in_frustum(means, scales, view.viewmat[0], view.K[0], view.width, view.height)
        if not (self.training and torch.is_grad_enabled()):
            terms = self.gaussian_terms()
            if crop_ids is not None:
                terms = GaussianTerms(*(term[crop_ids] for term in terms))
            responses = self.attention.attend(terms, words.tokens, words.mask, among=visible).responses
            return responses if visible is None else responses * visible[:, None]
        features, xyz = self.gauss_params["referring"], self.gauss_params["means"]
        if crop_ids is not None:
            features, xyz = features[crop_ids], xyz[crop_ids]
        if visible is None:
            out = self.attention(features, xyz, words.tokens, words.mask)
            self._attended = (out, words.mask)
            return out.responses
        keep = visible.nonzero()[:, 0]
        out = self.attention(features.index_select(0, keep), xyz.index_select(0, keep), words.tokens, words.mask)
        self._attended = (out, words.mask)
        full = out.responses.new_zeros(features.shape[0], out.responses.shape[1])
        return full.index_copy(0, keep, out.responses)

    def feature_channels(self, crop_ids: Optional[Tensor], view: View) -> "OrderedDict[str, Tensor]":
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        words = self._words
        if words is None and not self.training and self.query_state.query is not None:
            words = self.text_words([self.query_state.query.text])
        if words is not None and words.tokens.shape[0] > 0:
            out["referring_logit"] = self._view_responses(crop_ids, view, words)
        return out

    def get_outputs(self, camera) -> Dict:
        outputs = super().get_outputs(camera)
        logits = outputs.get("referring_logit")
        if logits is None or self.training or self._words is not None:
            return outputs
        probability = torch.sigmoid(logits[..., :1])  # of the live query, rendered with its own threshold
        mask = (probability > self.query_state.query.threshold).float()
        outputs["referring_probability"], outputs["referring_mask"] = probability, mask
        if self.config.query.mode == "highlight":
            tint = torch.tensor(self.config.query.highlight_color, device=self.device)
            outputs["rgb"] = outputs["rgb"] * (1 - 0.6 * mask) + tint * 0.6 * mask
        return outputs

    @torch.no_grad()
    def render_expressions(self, camera, texts: Sequence[str]) -> Tensor:
        """Logit maps [S, H, W] of ``texts`` in one view, all from one rasterization."""
        was_training = self.training
        self.eval()
        try:
            with self.rendering(self.text_words(texts)):
                outputs = self.get_outputs_for_camera(camera)
        finally:
            self.train(was_training)
        if "referring_logit" not in outputs:
            height, width = int(camera.height.flatten()[0]), int(camera.width.flatten()[0])
            return torch.zeros(len(texts), height, width, device=self.device)
        return outputs["referring_logit"].permute(2, 0, 1)

    # ------------------------------------------------------------------ queries

    def threshold(self, threshold: Optional[float] = None) -> float:
        """Probability above which a Gaussian (or pixel) is selected."""
        value = self.config.query.threshold if threshold is None else threshold
        return float(0.5 if value is None else value)

    @torch.no_grad()
    def text_query(self, text: str, negatives: Sequence[str] = (), threshold: Optional[float] = None) -> Tensor:
        """Select the Gaussians whose response to ``text`` exceeds ``threshold`` (a probability) and every negative's;
        becomes the live selection (undoable) and is rendered as ``referring_logit`` / ``referring_mask``.

        Attention runs over all Gaussians (a query has no view). Raises ValueError for an empty text; a text whose
        words the model never saw gives whatever (usually nothing) responds, never an error."""
        if not text.strip():
            raise ValueError("empty referring expression: type what to select, e.g. 'the mug left of the duck'")
        responses = self.responses(self.text_words([text, *negatives])).responses  # [N, 1 + negatives]
        probability = torch.sigmoid(responses[:, 0])
        opacity = torch.sigmoid(self.gauss_params["opacities"][:, 0])
        selected = (probability > self.threshold(threshold)) & (opacity > self.config.min_opacity)
        for column in range(1, responses.shape[1]):
            selected &= responses[:, 0] > responses[:, column]
        if self.vote_cameras is not None and self.config.selection_votes > 0 and bool(selected.any()):
            selected &= self.mask_votes(text, self.threshold(threshold)) >= 0.5
        self.query_state.push(selected, probability, query=LiveQuery(text, self.threshold(threshold)))
        return selected

    def mask_votes(self, text: str, threshold: float) -> Tensor:
        """Per Gaussian [N], the share of its blend weight in the voting views that falls inside ``text``'s rendered
        masks (0 for Gaussians no voting view sees)."""
        cameras = self.vote_cameras
        assert cameras is not None
        count = len(cameras)
        picks = torch.linspace(0, count - 1, min(count, self.config.selection_votes)).round().long().unique()
        params = self.gauss_params
        geometry = (
            params["means"],
            params["quats"],
            torch.exp(params["scales"]),
            torch.sigmoid(params["opacities"])[:, 0],
        )
        inside = torch.zeros(self.num_points, device=self.device)
        total = torch.zeros(self.num_points, device=self.device)
        for index in picks.tolist():
            camera = cameras[index : index + 1].to(self.device)
            mask = torch.sigmoid(self.render_expressions(camera, [text])) > threshold  # [1, H, W]
            view = self._view(camera)
            within, footprint = contributions_and_footprint(*geometry, view.viewmat, view.K, view.width, view.height,
                                                            mask, backend=self.config.rasterizer_backend)  # fmt: skip
            inside += within[:, 0]
            total += footprint
        return inside / total.clamp_min(1e-8)

    @property
    def selection(self) -> Optional[Tensor]:
        return self.query_state.selection

    def render_filter(self) -> Optional[Tensor]:
        if self._words is not None:
            return None  # explicit expression renders (eval, votes) always see the whole scene
        if not self.training and not self._config_query_applied:
            self._config_query_applied = True
            query = self.config.query
            if query.text and self.query_state.selection is None:
                self.text_query(query.text, query.negatives, query.threshold)
        selection = self.selection
        if self.training or selection is None or selection.shape[0] != self.num_points:
            return None
        if self.config.query.mode == "highlight":
            return None
        selection = selection.to(self.device)
        return selection if self.config.query.mode == "isolate" else ~selection

    # ------------------------------------------------------------------ training

    def training_expressions(self, batch: Dict[str, Tensor]) -> Tensor:
        """Ids [S] of the view's expressions that are trained on."""
        ids = batch.get("expression_ids")
        if ids is None:
            return torch.zeros(0, dtype=torch.long)
        return self.expressions.trained(ids.cpu(), self.config.held_out_kinds)

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        logits = outputs.get("referring_logit")
        ids = self.training_expressions(batch)
        if logits is None or ids.numel() == 0 or self._attended is None:
            return {"referring": self.gauss_params["referring"].sum() * 0.0}
        logits = logits.permute(2, 0, 1)  # [S, H, W]
        targets = target_masks(
            [self.expressions.object_ids[i] for i in ids.tolist()], batch["instance_ids"], batch["instance_masks"]
        )
        if targets.shape[-2:] != logits.shape[-2:]:
            targets = F.interpolate(targets[None].float(), size=logits.shape[-2:], mode="nearest")[0] > 0.5
        bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.device).float())
        attended, word_mask = self._attended
        sentences = sentence_embeddings(attended.words, word_mask)
        rho = rho_at(self._expressions_trained, self.config.rho_start, self.config.rho_factor, self.config.rho_every,
                     self.config.rho_floor)  # fmt: skip
        categories = self.expressions.categories[ids].to(logits.device)
        gtcl = gtcl_loss(attended.gaussians, attended.responses, sentences, categories, rho,
                         self.config.gtcl_temperature)  # fmt: skip
        self._expressions_trained += int(ids.numel())
        self._attended = None
        return {"referring_bce": bce, "referring_gtcl": self.config.gtcl_weight * gtcl.mean()}

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        return {"gaussian_count": self.num_points}
