"""Main job: make the default synthetic scene, train ag2aussian-ext on it, run a text and a click query, export;
then train referspat-ext on the frozen result and render a referring expression; then train rtgs2-ext across a
generated multi-scene set and segment its unseen scenes.

    .venv/bin/python scripts/demo.py [--out demo_out] [--steps 300] [--query duck] [--expression "the red car"]

Writes under <out>:
- scene/            the gs-synth dataset, with instance masks and label embeddings (gs-preprocess, offline MiniLM);
- runs/             the nerfstudio run (config.yml + checkpoint, language index included);
- eval.json         ns-eval style metrics: PSNR/SSIM and both LERF-OVS text-query protocols;
- eval/             per-pair results of each protocol (opengaussian-lerf.json, langsplat-lerf.json);
- query/            gs-query output for the text query: selection/, relevancy/, rgb/ PNGs per held-out view;
- click/            the selection mask of a click on the centre of an object in the first held-out view;
- renders/          ground truth | render | depth | instances of every held-out view;
- <query>.ply       the Gaussians the text query selects; scene_instances.ply the whole scene with instance_id;
- refer_runs/       the referspat-ext run (paraphrases and spatial expressions held out of training);
- refer_eval/       its per-(view, expression) results (referring.json); refer_query/ gs-query of --expression;
- rtgs2_scenes/     the multi-scene set (train + unseen scenes, each with gaussians.ply); rtgs2_runs/ the run;
- rtgs2_eval/       cross-scene and novel-view reports (JSON, per-class Markdown tables, confusion-matrix PNGs) and
                    the predicted class maps of the unseen scenes (predictions/).
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

from gsstudio_ext.cli import export as gs_export
from gsstudio_ext.cli import query as gs_query
from gsstudio_ext.cli import rtgs2_eval
from gsstudio_ext.data.embedding_sources import LabelEmbeddingConfig
from gsstudio_ext.data.mask_sources import SidecarMaskSourceConfig
from gsstudio_ext.data.preprocess import preprocess_dataset
from gsstudio_ext.data.synthetic import generate_scene, generate_scenes
from gsstudio_ext.data.synthetic.config import SynthConfig
from gsstudio_ext.methods.ag2aussian.config import SHORT_SCHEDULE, ag2_trainer_config
from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig
from gsstudio_ext.methods.base.training import prepare_config, train
from gsstudio_ext.methods.referspat.config import SHORT_LRS as REFER_LRS
from gsstudio_ext.methods.referspat.config import SHORT_SCHEDULE as REFER_SCHEDULE
from gsstudio_ext.methods.referspat.config import refer_trainer_config
from gsstudio_ext.methods.referspat.model import ReferModelConfig
from gsstudio_ext.methods.rtgs2.config import rtgs2_trainer_config, small_model


@dataclass
class DemoArgs:
    """Options of the main job."""

    out: Path = Path("demo_out")
    """Folder for the scene, the run, the metrics, the masks and the exports."""
    steps: int = 300
    """Training steps."""
    query: str = "duck"
    """Text query to render and export (an object name of the default scene: mug, car, duck, chair ...)."""
    device: str = "cpu"
    """Device to train on (cpu or cuda)."""
    refer_steps: int = 150
    """referspat-ext training steps (0 skips the referring stage)."""
    expression: str = "the red car"
    """Referring expression to render with gs-query."""
    rtgs2_steps: int = 1000
    """rtgs2-ext Stage-B steps after its 300 Stage-A steps (0 skips the semantic stage)."""


HELD_OUT_KINDS = ("paraphrase", "left_right", "front_behind")
"""Expression kinds the demo's referspat-ext run does not train on, to show how it generalises."""


def referring_stage(args: DemoArgs, scene: Path, ag2_config: Path) -> dict:
    """Train referspat-ext on the frozen ag2aussian-ext scene; its metrics and a gs-query of ``args.expression``."""
    model = ReferModelConfig(scene=ag2_config, held_out_kinds=HELD_OUT_KINDS, **REFER_SCHEDULE)
    config = refer_trainer_config(model, max_steps=args.refer_steps, **REFER_LRS)
    config = prepare_config(config, scene, args.out / "refer_runs", max_steps=args.refer_steps, device=args.device)
    trainer, config_path = train(config)
    with torch.no_grad():
        metrics = trainer.pipeline.get_average_eval_image_metrics(output_path=args.out / "refer_eval")
    query = gs_query.run(gs_query.QueryCommand(config_path, args.expression, args.out / "refer_query"))
    referring = {k.split("/")[-1]: v for k, v in metrics.items() if k.count("/") == 1 and k.startswith("referring")}
    return {"config": str(config_path), "held_out_kinds": list(HELD_OUT_KINDS), "metrics": referring,
            "expression": args.expression, "selected_gaussians": query["num_selected"]}  # fmt: skip


def semantic_stage(args: DemoArgs) -> dict:
    """Train rtgs2-ext on eight generated scenes and score two unseen ones (same classes, new layouts)."""
    data = args.out / "rtgs2_scenes"
    if not (data / "scenes.json").exists():
        config = SynthConfig(seed=7, width=64, height=64, num_views=24, eval_every=4, fuse_gaussians=True)
        generate_scenes(data, config, num_scenes=10, unseen_fraction=0.2)
    model = small_model(0.01, ssl_steps=300, background_color=(1.0, 1.0, 1.0))
    steps = 300 + args.rtgs2_steps
    config = rtgs2_trainer_config(model, max_steps=steps, fusion_lr=1e-3)
    config.pipeline.augment.hue = 0.5  # objects are painted in random colours: hue says nothing of the class
    config = prepare_config(config, data, args.out / "rtgs2_runs", max_steps=steps, device=args.device)
    _, config_path = train(config)
    metrics = rtgs2_eval.run(
        rtgs2_eval.RTGS2EvalCommand(config_path, out=args.out / "rtgs2_eval", save_predictions=True)
    )
    return {"config": str(config_path), "metrics": {k: round(v, 4) for k, v in metrics.items() if "/" not in k}}


def save_renders(pipeline, folder: Path) -> list[Path]:
    """Ground truth | render | depth | instance colours of every held-out view, as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (camera, batch) in enumerate(pipeline.datamanager.fixed_indices_eval_dataloader):
        outputs = pipeline.model.get_outputs_for_camera(camera)
        gt = batch["image"][..., :3].float().cpu()
        gt = gt / 255.0 if gt.max() > 1.0 else gt
        depth = apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"])
        panels = [gt, outputs["rgb"].cpu(), depth.cpu(), outputs["instance"].cpu()]
        image = (torch.cat(panels, dim=1).clamp(0, 1).numpy() * 255).astype(np.uint8)
        paths.append(folder / f"eval_{index:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def centre_pixel(mask: torch.Tensor) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from its border."""
    depth, current = torch.zeros(mask.shape), mask.float()[None, None]
    while current.sum() > 0:
        depth += current[0, 0]
        current = -torch.nn.functional.max_pool2d(-current, 3, stride=1, padding=1)
    flat = int(depth.flatten().argmax())
    return flat % mask.shape[1], flat // mask.shape[1]


def click_query(pipeline, folder: Path) -> dict:
    """Click the centre of the largest object of the first held-out view; save the rendered selection mask."""
    model = pipeline.model
    camera, batch = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    mask = max(batch["instance_masks"], key=lambda m: int(m.sum()))
    x, y = centre_pixel(mask)
    selected = model.click_query(camera, x, y)
    rendered = model.get_outputs_for_camera(camera)["selection"][..., 0].cpu() > 0.5
    model.query_state.undo()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rendered.numpy().astype(np.uint8) * 255).save(folder / "selection.png")
    inter, union = (rendered & mask.cpu()).sum(), (rendered | mask.cpu()).sum()
    return {"pixel": [x, y], "selected_gaussians": int(selected.sum()), "iou_with_gt": float(inter / union)}


def main(args: DemoArgs) -> None:
    start = time.time()
    scene = args.out / "scene"
    if not (scene / "transforms.json").exists():
        generate_scene(scene, SynthConfig())
    preprocess_dataset(scene, SidecarMaskSourceConfig(), LabelEmbeddingConfig())  # cached: re-runs reuse it
    model = AG2ModelConfig(**SHORT_SCHEDULE, densify_until=args.steps - 50)
    config = ag2_trainer_config(model, max_steps=args.steps)
    config.pipeline.datamanager.sidecars = ("instances", "embeddings")
    config = prepare_config(config, scene, args.out / "runs", max_steps=args.steps, device=args.device)
    trainer, config_path = train(config)  # the language index is built at the last step, into the checkpoint
    pipeline = trainer.pipeline
    with torch.no_grad():
        metrics = pipeline.get_average_eval_image_metrics(output_path=args.out / "eval", get_std=True)
        pipeline.eval()
        renders = save_renders(pipeline, args.out / "renders")
        click = click_query(pipeline, args.out / "click")
    query = gs_query.run(gs_query.QueryCommand(config_path, args.query, args.out / "query"))
    selection_ply = args.out / f"{args.query.replace(' ', '_')}.ply"
    selected = gs_export.run(gs_export.ExportCommand(config_path, selection_ply, query=args.query))
    whole = gs_export.run(gs_export.ExportCommand(config_path, args.out / "scene_instances.ply"))
    report = {
        "method_name": config.method_name,
        "checkpoint": str(config.get_checkpoint_dir()),
        "config": str(config_path),
        "results": metrics,
        "gaussians": int(pipeline.model.num_points),
        "text_query": {"query": args.query, "selected_gaussians": selected.num_selected, "ply": str(selection_ply)},
        "click_query": click,
    }
    if args.refer_steps > 0:
        report["referspat"] = referring_stage(args, scene, config_path)
    if args.rtgs2_steps > 0:
        report["rtgs2"] = semantic_stage(args)
    report["wall_time_s"] = round(time.time() - start, 1)
    (args.out / "eval.json").write_text(json.dumps(report, indent=2))
    og = {k.split("/")[-1]: v for k, v in metrics.items() if k.count("/") == 1 and k.startswith("opengaussian")}
    print(f"\nscene:        {scene}\nrun:          {config_path}\nmetrics:      {args.out / 'eval.json'}")
    print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, {report['gaussians']} Gaussians")
    print(f"text queries: {og} (opengaussian-lerf, every object by name on the held-out views)")
    print(f"query masks:  {len(query['files'])} PNGs in {args.out / 'query'} for {args.query!r}")
    print(f"click mask:   {args.out / 'click' / 'selection.png'} (IoU with GT {click['iou_with_gt']:.2f})")
    print(f"exports:      {selection_ply} ({selected.num_written} Gaussians), {whole.path} (with instance_id)")
    print(f"renders:      {len(renders)} PNGs in {args.out / 'renders'}")
    print(f"view it:      .venv/bin/ns-viewer --load-config {config_path}")
    if "referspat" in report:
        refer = report["referspat"]
        scores = {k: round(v, 3) for k, v in refer["metrics"].items()}
        print(f"\nreferspat-ext: {refer['config']}\nreferring:    {scores} (mIoU over (held-out view, expression))")
        print(f"expression:   {args.expression!r} -> {refer['selected_gaussians']} Gaussians, masks in "
              f"{args.out / 'refer_query'}")  # fmt: skip
    if "rtgs2" in report:
        print(f"\nrtgs2-ext:    {report['rtgs2']['config']}\nunseen scenes: {report['rtgs2']['metrics']} (pooled "
              f"confusion), report and predicted class maps in {args.out / 'rtgs2_eval'}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(DemoArgs))
