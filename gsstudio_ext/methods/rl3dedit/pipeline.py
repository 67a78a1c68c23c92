"""rl3dedit-ext pipeline: ns-train's steps are the refit steps of one single-pass edit (the 2D edit runs before the
first step), and ns-eval adds the edit metrics and the edit report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from gsstudio_ext.eval.part_editing import write_edit_report
from gsstudio_ext.methods.rl3dedit.edit_eval import RL3DEditEvalConfig, evaluate_edit
from gsstudio_ext.methods.rl3dedit.refit import Refit
from gsstudio_ext.methods.rl3dedit.single_pass import SinglePassEdit
from gsstudio_ext.methods.romap.local_edit import EditViews
from gsstudio_ext.methods.romap.pipeline import views_of


@dataclass
class RL3DEditPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline whose training is one edit: the 2D edit of the selected views, then the refit."""

    _target: Type = field(default_factory=lambda: RL3DEditPipeline)
    show_every: int = 50
    """Refit steps between updates of the scene the viewer shows."""
    edit_eval: RL3DEditEvalConfig = field(default_factory=RL3DEditEvalConfig)
    """ns-eval's edit metrics."""


class _RunningEdit:
    """The edit ns-train runs: its single pass, its refit stepper and the loss of the current step."""

    def __init__(self, edit: SinglePassEdit, views: Tensor, refit: Refit) -> None:
        self.edit, self.views, self.refit = edit, views, refit
        self.loss: Optional[Tensor] = None


class RL3DEditPipeline(VanillaPipeline):
    config: RL3DEditPipelineConfig

    def __init__(self, config: RL3DEditPipelineConfig, device, *args, **kwargs) -> None:
        super().__init__(config, device, *args, **kwargs)
        views, device = views_of(self.datamanager.train_dataset.cameras), self.model.device
        self.model.train_views = EditViews(views.viewmats.to(device), views.Ks.to(device), views.width, views.height)
        self.refit_steps: Optional[int] = None
        self.running: Optional[_RunningEdit] = None

    def start_edit(self) -> _RunningEdit:
        """Render the selected views, edit them in 2D, and set up the refit (as many steps as ns-train runs)."""
        model = self.model
        instruction = model.config.instruction.strip()
        if not instruction:
            raise ValueError(
                'give the edit: --pipeline.model.instruction "make the mushroom red striped" (with the offline '
                "editor: --pipeline.model.edit.editor procedural and a colour word)"
            )
        edit = model.single_pass()
        CONSOLE.print(f"rl3dedit-ext: editing {instruction!r} with {edit.config.editor}")
        indices = edit.view_indices()
        sources = edit.sources(indices)
        edited = edit.edit_views(sources, instruction)
        return _RunningEdit(edit, indices, edit.refit(sources, edited, self.refit_steps))

    def get_train_loss_dict(self, step: int) -> Tuple[Dict, Dict[str, Tensor], Dict[str, Tensor]]:
        """The loss of one refit step (the refit's own Adam applies it after nerfstudio's backward pass)."""
        if self.running is None:
            self.running = self.start_edit()
        self.running.loss = self.running.refit.loss()
        return {}, {"refit": self.running.loss}, {}

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        self.refit_steps = training_callback_attributes.trainer.config.max_num_iterations  # type: ignore[union-attr]
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self._after_step))
        return callbacks

    def _after_step(self, step: int) -> None:
        running = self.running
        if running is None or running.loss is None:
            return
        refit = running.refit
        refit.update(running.loss)
        running.loss = None
        if refit.done:
            model = self.model
            model.record(refit.scene(), model.config.instruction, running.edit.editor.name, running.views)
            self.running = None
        elif refit.step % self.config.show_every == 0:
            self.model.show(refit.scene())

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        """PSNR/SSIM of ``rgb`` plus, after an edit, Ph-Loss (edited and original) and CLIP-dir; with
        ``output_path`` also the edit report (before/after grid)."""
        metrics = super().get_average_eval_image_metrics(step, output_path, get_std)
        self.eval()
        try:
            result = evaluate_edit(self.model, self.datamanager, self.config.edit_eval)
        finally:
            self.train()
        metrics.update(result.metrics)
        if output_path is not None and result.before is not None:
            write_edit_report(
                Path(output_path), result.metrics, result.before, result.after, result.changed, result.provider,
                result.instruction, mask_name="changed pixels", title="Scene edit report",
            )  # fmt: skip
        return metrics
