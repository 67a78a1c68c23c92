"""referspat-ext pipeline: each training view renders all of its expressions at once; ns-eval adds the referring
segmentation metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from gsstudio_ext.eval.referring import ReferringEvalConfig, evaluate_referring, referring_views


@dataclass
class ReferPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline that hands each view's expressions to the model and scores referring masks in ns-eval."""

    _target: Type = field(default_factory=lambda: ReferPipeline)
    referring_eval: ReferringEvalConfig = field(default_factory=ReferringEvalConfig)
    """Referring segmentation metrics on the eval frames (Ref-LERF protocol)."""


class ReferPipeline(VanillaPipeline):
    config: ReferPipelineConfig

    def __init__(self, config: ReferPipelineConfig, device, *args, **kwargs) -> None:
        super().__init__(config, device, *args, **kwargs)
        self.model.vote_cameras = self.datamanager.train_dataset.cameras  # views that vote on 3D selections

    def get_train_loss_dict(self, step: int):
        camera, batch = self.datamanager.next_train(step)
        model = self.model
        with model.rendering(model.expression_words(model.training_expressions(batch))):
            outputs = self._model(camera)
            metrics = model.get_metrics_dict(outputs, batch)
            losses = model.get_loss_dict(outputs, batch, metrics)
        return outputs, losses, metrics

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ):
        """Image metrics plus "referring/<metric>" (mIoU over every (view, expression) pair and its breakdowns);
        with ``output_path`` (ns-eval --render-output-path) the per-pair and per-expression results are written
        there as referring.json."""
        metrics = super().get_average_eval_image_metrics(step, output_path, get_std)
        if not self.config.referring_eval.enabled:
            return metrics
        model = self.model
        views = referring_views(self.datamanager, model.expressions)
        if not views:
            return metrics
        self.eval()
        try:
            result = evaluate_referring(
                model.render_expressions,
                views,
                model.expressions,
                self.config.referring_eval,
                held_out_kinds=model.config.held_out_kinds,
                scene=Path(self.datamanager.config.data or "scene").name,
            )
        finally:
            self.train()
        metrics.update(result.flat_metrics())
        if output_path is not None:
            result.save(Path(output_path) / f"{result.protocol}.json")
        return metrics
