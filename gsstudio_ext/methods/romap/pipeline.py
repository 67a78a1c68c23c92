"""romap-ext pipeline: hands the training cameras and part targets to the model, runs the configured edit after the
last label-fitting step, and adds part and edit metrics to ns-eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.data.datamanager import dataset_root
from gsstudio_ext.eval.part_editing import write_edit_report
from gsstudio_ext.methods.romap.edit_eval import EditEvalConfig, evaluate_edit
from gsstudio_ext.methods.romap.local_edit import EditViews


@dataclass
class RoMaPPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline that fits the part labels, then optionally edits one part."""

    _target: Type = field(default_factory=lambda: RoMaPPipeline)
    edit_part: str = ""
    """Part to edit after training (one of --pipeline.model.editor.parts); empty: no edit."""
    edit_prompt: str = ""
    """Edit prompt of that part, e.g. "gold" or "red striped" (procedural) or "a gold chair leg" (SLaMP)."""
    edit_eval: EditEvalConfig = field(default_factory=EditEvalConfig)
    """ns-eval's part and edit metrics."""


def views_of(cameras) -> EditViews:
    """Training cameras as (OpenCV viewmats, Ks, width, height); every view must share one size."""
    widths, heights = cameras.width.unique(), cameras.height.unique()
    if len(widths) != 1 or len(heights) != 1:
        raise ValueError("romap-ext needs training images of one size (resize them or pick one camera group)")
    viewmats = viewmat_from_c2w(cameras.camera_to_worlds)
    return EditViews(viewmats, cameras.get_intrinsics_matrices(), int(widths[0]), int(heights[0]))


class RoMaPPipeline(VanillaPipeline):
    config: RoMaPPipelineConfig

    def __init__(self, config: RoMaPPipelineConfig, device, *args, **kwargs) -> None:
        super().__init__(config, device, *args, **kwargs)
        model, dataset = self.model, self.datamanager.train_dataset
        model.train_views = EditViews(
            *(t.to(model.device) if torch.is_tensor(t) else t for t in views_of(dataset.cameras))
        )
        model.dataset = dataset_root(self.datamanager.config.data)
        model.stems = [Path(f).stem for f in dataset.image_filenames]
        if model.config.editor.parts:
            model.part_targets = model.editor().part_targets()

    def get_train_loss_dict(self, step: int):
        if self.model.part_targets is None:
            raise ValueError(
                "name the parts to segment, smaller parts first: --pipeline.model.editor.parts legs back seat "
                "(words of one part joined by '+')"
            )
        return super().get_train_loss_dict(step)

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        last = training_callback_attributes.trainer.config.max_num_iterations - 1  # type: ignore[union-attr]

        def edit_at_the_end(step: int) -> None:
            if step == last and self.config.edit_part:
                self.run_edit(self.config.edit_part, self.config.edit_prompt)

        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], edit_at_the_end))
        return callbacks

    def run_edit(self, part: str, prompt: str, progress=None):
        """Edit ``part`` toward ``prompt`` with the current label field; the model then renders the edit."""
        CONSOLE.print(f"romap-ext: editing part {part!r} toward {prompt!r} ({self.model.config.editor.edit_target})")
        return self.model.edit(part, prompt, progress)

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        """PSNR/SSIM of ``rgb`` plus part mIoU (with ground-truth part maps) and, after an edit, locality, CLIP score
        and CLIP directional similarity; with ``output_path`` also the edit report."""
        metrics = super().get_average_eval_image_metrics(step, output_path, get_std)
        self.eval()
        try:
            result = evaluate_edit(self.model, self.datamanager, self.config.edit_eval)
        finally:
            self.train()
        metrics.update(result.metrics)
        if output_path is not None and result.before is not None:
            write_edit_report(
                Path(output_path), result.metrics, result.before, result.after, result.masks2d,
                result.provider, result.prompt,
            )  # fmt: skip
        return metrics
