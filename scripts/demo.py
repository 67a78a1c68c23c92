"""Main job: make the default synthetic scene, train the base feature model on it, evaluate held-out views.

    .venv/bin/python scripts/demo.py [--out demo_out] [--steps 300]

Writes <out>/scene (the gs-synth dataset), <out>/runs (nerfstudio run: config.yml + checkpoint), <out>/eval.json
(ns-eval style metrics) and <out>/renders/*.png (ground truth | render | depth for each held-out view).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from nerfstudio.utils.colormaps import apply_depth_colormap
from PIL import Image

from gsstudio_ext.data.synthetic import generate_scene
from gsstudio_ext.data.synthetic.config import SynthConfig
from gsstudio_ext.methods.base.model import FeatureSplatfactoModelConfig
from gsstudio_ext.methods.base.trainer_config import SHORT_SCHEDULE, gaussian_trainer_config
from gsstudio_ext.methods.base.training import prepare_config, train


@dataclass
class DemoArgs:
    """Options of the main job."""

    out: Path = Path("demo_out")
    """Folder for the scene, the run, the metrics and the renders."""
    steps: int = 300
    """Training steps."""
    device: str = "cpu"
    """Device to train on (cpu or cuda)."""


def save_renders(pipeline, folder: Path) -> list[Path]:
    """Ground truth | render | depth of every held-out view, as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (camera, batch) in enumerate(pipeline.datamanager.fixed_indices_eval_dataloader):
        outputs = pipeline.model.get_outputs_for_camera(camera)
        gt = batch["image"][..., :3].float().cpu()
        gt = gt / 255.0 if gt.max() > 1.0 else gt
        depth = apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"])
        panels = [gt, outputs["rgb"].cpu(), depth.cpu()]
        image = (torch.cat(panels, dim=1).clamp(0, 1).numpy() * 255).astype(np.uint8)
        paths.append(folder / f"eval_{index:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def main(args: DemoArgs) -> None:
    start = time.time()
    scene = args.out / "scene"
    if not (scene / "transforms.json").exists():
        generate_scene(scene, SynthConfig())
    model = FeatureSplatfactoModelConfig(**SHORT_SCHEDULE, feature_dims={"feature": 13})
    config = gaussian_trainer_config("gsstudio-splatfacto", model, extra_lrs={"feature": 0.0025}, max_steps=args.steps)
    config = prepare_config(config, scene, args.out / "runs", max_steps=args.steps, device=args.device)
    trainer, config_path = train(config)
    pipeline = trainer.pipeline
    with torch.no_grad():
        metrics = pipeline.get_average_eval_image_metrics(get_std=True)
        pipeline.eval()
        renders = save_renders(pipeline, args.out / "renders")
    report = {
        "method_name": config.method_name,
        "checkpoint": str(config.get_checkpoint_dir()),
        "config": str(config_path),
        "results": metrics,
        "gaussians": int(pipeline.model.num_points),
        "wall_time_s": round(time.time() - start, 1),
    }
    (args.out / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"\nscene:    {scene}\nrun:      {config_path}\nmetrics:  {args.out / 'eval.json'}")
    print(f"renders:  {len(renders)} PNGs in {args.out / 'renders'}")
    print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, {report['gaussians']} Gaussians")
    print(f"view it:  .venv/bin/ns-viewer --load-config {config_path}")


if __name__ == "__main__":
    main(tyro.cli(DemoArgs))
