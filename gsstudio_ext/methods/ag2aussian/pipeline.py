"""ag2aussian-ext pipeline: nerfstudio's VanillaPipeline plus text-query metrics in ns-eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from gsstudio_ext.eval.text_queries import TextQueryEvalConfig, dataset_pairs, evaluate_text_queries
from gsstudio_ext.methods.base.queries import QueryState


@dataclass
class AG2PipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline whose eval adds the LERF-OVS text-query protocols when the dataset supports them."""

    _target: Type = field(default_factory=lambda: AG2Pipeline)
    text_query_eval: TextQueryEvalConfig = field(default_factory=TextQueryEvalConfig)
    """Text-query metrics (OpenGaussian and LangSplat protocols) on the eval frames."""


class AG2Pipeline(VanillaPipeline):
    config: AG2PipelineConfig

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ):
        """Image metrics, plus "<protocol>/<metric>" text-query metrics; with ``output_path`` (ns-eval
        --render-output-path) each protocol's per-pair results are written there as JSON."""
        metrics = super().get_average_eval_image_metrics(step, output_path, get_std)
        model = self.model
        if not self.config.text_query_eval.enabled or model.language is None:
            return metrics
        views, pairs = dataset_pairs(self.datamanager, self.config.text_query_eval.min_gt_pixels)
        if not pairs:
            return metrics
        state, selection_mode = model.query_state, model.config.query.mode
        self.eval()
        model.query_state, model.config.query.mode = QueryState(), "highlight"  # the user's selection is kept
        try:
            results = evaluate_text_queries(
                model.text_query,
                model.get_outputs_for_camera,
                views,
                pairs,
                self.config.text_query_eval,
                scene=Path(self.datamanager.config.data or "scene").name,
            )
        finally:
            model.query_state, model.config.query.mode = state, selection_mode
            self.train()
        for result in results:
            metrics.update(result.flat_metrics())
            if output_path is not None:
                result.save(Path(output_path) / f"{result.protocol}.json")
        return metrics
