"""romap-ext: wall time of one full RoMaP part edit at the paper's resolution (512x512) with the full-size
stabilityai/stable-diffusion-3-medium-diffusers architecture, through the real ``PartEditor`` (segment, then edit).

The SD3 provider is a ``RectifiedFlowModel`` built from full-size configs written below, with random weights (the
same compute as the real ones): the MMDiT (24 joint blocks, 24 heads x 64, patch 2, 16 latent channels, 2.0 B
parameters), the SD3 VAE (16 latent channels, shift 0.0609, scale 1.5305), CLIP-L and OpenCLIP-bigG text encoders
with projection and the T5-XXL encoder (4.7 B; ``--t5-layers`` can shorten it: prompts are encoded once, outside
the loop). Modules are created directly on the GPU in fp16. Tokenizers are built locally (no hub): each known word is
one token, others split into letters; the vocabulary size only changes the embedding tables, not the compute.

The scene is a snowman of ``--gaussians`` surface Gaussians (SH degree 3) in three parts, smaller first: "hat",
"head", "body"; ``--views`` cameras on a ring around it at ``--size`` x ``--size``. Everything else is the plugin's
defaults: 3D-GALP (600 label steps; each view's target from SD3 joint attention after the 4-forward controlled
inversion, computed once per view), M3D / M2D, Gaussian prior removal, SLaMP on one anchor view (20 inversion + 20
guided steps), then ``PartEditConfig.steps`` (300) steps of masked L1 + regularized SDS (RFDS: one unconditional
forward plus a CFG pair, with the gradient through the VAE encoder). CascadePSP is the identity, as offline.
Random weights give arbitrary attention maps: when GALP leaves the edited part below ``--min-part`` of the Gaussians,
the ground-truth part labels replace the label field before the edit (the JSON's "labels" says which were used).

Timed (CUDA-synchronised wall clock): ``build_s`` (random init of all modules), ``prompts_s`` (every prompt of the
edit encoded once, then the text encoders released, as RoMaP's code does), ``segment_s`` (of which
``attention_targets_s``: the SD3 part maps of every view), ``edit_s`` (of which ``slamp_s``: the anchor edit, and
``sds_loop_s``: the optimisation loop, with ``sds_step_ms`` and ``sds_guidance_ms``: the RFDS forward per step),
and ``total_edit_s = segment_s + edit_s``. Warm-ups (gsplat kernels, the first transformer call) are timed apart.

    python scripts/bench/romap.py --out romap.json                       # GPU, full size
    OMP_NUM_THREADS=1 python scripts/bench/romap.py --tiny               # CPU smoke test with a tiny SD3
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import sync as _sync  # noqa: E402

from gsstudio_ext.models.rectified_flow import RectifiedFlowConfig, RectifiedFlowModel  # noqa: E402
from gsstudio_ext.models.sd3_tiny import TINY_WORDS, tiny_tokenizer  # noqa: E402

PARTS = ("hat", "head", "body")
BASE_PROMPT = "a photo of a snowman"
EDIT_PROMPT = "a photo of a snowman with a golden hat"

# stabilityai/stable-diffusion-3-medium-diffusers, the configs of its subfolders
SD3_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)  # fmt: skip
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
)  # fmt: skip
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
)  # fmt: skip


@contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are created on ``device`` in ``dtype`` (so billions of random weights initialise in place)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class RandomSD3MediumConfig(RectifiedFlowConfig):
    """SD3-medium's architecture with seeded random weights and local tokenizers (benchmarks: same compute)."""

    _target: Type = field(default_factory=lambda: RandomSD3MediumModel)
    dtype: str = "float16"
    """Weights and activations (RoMaP runs SD3 in fp16)."""
    t5_layers: int = 24
    """T5-XXL encoder blocks (24 = full size); prompt encoding only."""
    words: Tuple[str, ...] = TINY_WORDS + ("snowman", "hat", "golden", "body", "head")
    """Whole-word tokenizer vocabulary; other words split into letters."""
    seed: int = 0
    """Seed of the random weights."""


class RandomSD3MediumModel(RectifiedFlowModel):
    config: RandomSD3MediumConfig

    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        c = self.config
        clip_tok = tiny_tokenizer(c.words, "<|startoftext|>", "<|endoftext|>", "<pad>", c.max_clip_length)
        t5_tok = tiny_tokenizer(c.words, None, "</s>", "<pad>", c.max_t5_length)
        ids = dict(
            pad_token_id=clip_tok.pad_token_id, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id
        )
        t5 = dict(T5_XXL, num_layers=c.t5_layers)
        t5_ids = dict(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0)
        torch.manual_seed(c.seed)
        with building_on(self.device, self.dtype):
            modules = {
                "transformer": SD3Transformer2DModel(**SD3_TRANSFORMER),
                "vae": AutoencoderKL(**SD3_VAE),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **ids)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)),
                "text_encoder_3": T5EncoderModel(T5Config(**t5, **t5_ids)),
            }
        return modules, [clip_tok, clip_tok, t5_tok]


# ----------------------------------------------------------------------------------------------------------- scene


def snowman_scene(num: int, generator: torch.Generator):
    """A GaussianScene of ~``num`` Gaussians (SH degree 3) on the surfaces of a snowman standing on z = 0, and the
    part id Long[N] of each (1 hat, 2 head, 3 body): a black cylinder hat on a white head sphere on a white body."""
    from gsstudio_ext.core.scene import GaussianScene
    from gsstudio_ext.core.sh import RGB2SH

    counts = [int(0.15 * num), int(0.25 * num)]
    counts.append(num - sum(counts))

    def sphere(n: int, centre: Tuple[float, float, float], radius: float) -> torch.Tensor:
        return torch.tensor(centre) + radius * F.normalize(torch.randn(n, 3, generator=generator), dim=-1)

    def hat(n: int, base: float, radius: float, height: float) -> torch.Tensor:
        angle = 2 * math.pi * torch.rand(n, generator=generator)
        rim = torch.rand(n, generator=generator).sqrt()  # uniform on the top disc
        on_top = torch.rand(n, generator=generator) < 0.25
        r = torch.where(on_top, radius * rim, torch.full((n,), radius))
        z = torch.where(on_top, torch.full((n,), base + height), base + height * torch.rand(n, generator=generator))
        return torch.stack([r * torch.cos(angle), r * torch.sin(angle), z], dim=-1)

    means = torch.cat(
        [hat(counts[0], 1.38, 0.2, 0.35), sphere(counts[1], (0, 0, 1.15), 0.3), sphere(counts[2], (0, 0, 0.5), 0.5)]
    )
    part = torch.cat([torch.full((n,), j + 1, dtype=torch.long) for j, n in enumerate(counts)])
    colour = torch.tensor([[0.08, 0.08, 0.1], [0.92, 0.92, 0.95], [0.95, 0.95, 0.97]])[part - 1]
    colour = (colour + 0.03 * torch.randn(num, 3, generator=generator)).clamp(0.0, 1.0)
    scene = GaussianScene(
        means=means,
        quats=F.normalize(torch.randn(num, 4, generator=generator), dim=-1),
        log_scales=math.log(0.012) + 0.2 * torch.randn(num, 3, generator=generator),
        opacity_logits=torch.full((num,), 2.0),
        sh_dc=RGB2SH(colour),
        sh_rest=0.02 * torch.randn(num, 15, 3, generator=generator),
    )
    return scene, part


def ring_views(views: int, size: int, device: str):
    """``views`` cameras on a ring 3.2 m from the snowman's axis, heights 0.9-1.5 m, looking at its middle."""
    from gsstudio_ext.core.cameras import viewmat_from_c2w
    from gsstudio_ext.methods.romap.local_edit import EditViews

    c2ws = []
    target = torch.tensor([0.0, 0.0, 0.85])
    for i in range(views):
        angle = 2 * math.pi * i / views
        eye = torch.tensor([3.2 * math.cos(angle), 3.2 * math.sin(angle), 1.2 + 0.3 * math.sin(3 * angle)])
        forward = F.normalize(target - eye, dim=0)
        right = F.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
        up = torch.linalg.cross(right, forward)
        c2ws.append(torch.stack([right, up, -forward, eye], dim=1))  # OpenGL camera axes
    f = 1.5 * size
    K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    viewmats = viewmat_from_c2w(torch.stack(c2ws)).to(device)
    return EditViews(viewmats, K.expand(views, 3, 3).contiguous().to(device), size, size)


# ----------------------------------------------------------------------------------------------------------- timing


@contextmanager
def timed_calls(owner: Any, name: str) -> Iterator[List[float]]:
    """Wrap ``owner.name`` (a module function or a class's method) so that each call's synchronised wall time is
    appended to the yielded list; the original is restored on exit."""
    original = getattr(owner, name)
    durations: List[float] = []

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _sync()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync()
            durations.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    try:
        yield durations
    finally:
        setattr(owner, name, original)


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """(fn(), synchronised seconds)."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def printer(stage: str, every: int) -> Callable[[int, int, float], None]:
    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            print(f"  {stage} {step}/{total} loss {loss:.4g}", flush=True)

    return progress


def peak_gb(device: str) -> Any:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# ----------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=300_000)
    parser.add_argument("--views", type=int, default=64, help="training views (an IN2N face scene has ~60-100)")
    parser.add_argument("--size", type=int, default=512, help="view side in pixels (RoMaP: 512)")
    parser.add_argument("--galp-steps", type=int, default=None, help="default: GALPConfig.steps (600)")
    parser.add_argument("--edit-steps", type=int, default=None, help="default: PartEditConfig.steps (300)")
    parser.add_argument("--t5-layers", type=int, default=24, help="T5-XXL encoder blocks (24 = full)")
    parser.add_argument("--part", default="hat", choices=PARTS, help="part to edit")
    parser.add_argument(
        "--min-part", type=float, default=0.01, help="fraction of the Gaussians below which GALP's part is replaced"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny SD3, 64x64, few steps, few Gaussians")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"

    from gsstudio_ext.core.scene_render import render_scene
    from gsstudio_ext.methods.romap import diffusion_sources, part_editor
    from gsstudio_ext.methods.romap.labels import labels_to_sh
    from gsstudio_ext.methods.romap.part_attention import segmentation_prompt
    from gsstudio_ext.methods.romap.part_editor import PartEditor, PartEditorConfig
    from gsstudio_ext.methods.romap.rfds import view_prompt
    from gsstudio_ext.models.sd3_tiny import TinySD3Config

    config = PartEditorConfig(parts=PARTS, base_prompt=BASE_PROMPT, edit_target="slamp")
    if args.tiny:
        args.gaussians, args.views, args.size = min(args.gaussians, 3000), min(args.views, 6), 64
        config.diffusion = TinySD3Config(words=RandomSD3MediumConfig.words)
        config.diffusion_size = 64
        config.galp.steps, config.galp.num_anchors, config.galp.k = 20, 50, 5
        config.edit.steps = 4
        config.attention.num_timesteps = 3
        config.slamp.slamp.num_steps, config.slamp.slamp.mix_steps = 4, 2
    else:
        config.diffusion = RandomSD3MediumConfig(t5_layers=args.t5_layers)
        config.diffusion_size = args.size
    if args.galp_steps is not None:
        config.galp.steps = args.galp_steps
    if args.edit_steps is not None:
        config.edit.steps = args.edit_steps

    gen = torch.Generator().manual_seed(0)
    scene, truth = snowman_scene(args.gaussians, gen)
    scene, truth = scene.to(device), truth.to(device)
    views = ring_views(args.views, args.size, device)
    result: Dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny SD3 (random)" if args.tiny else "SD3-medium architecture (random weights, fp16)",
        "gaussians": scene.num_gaussians,
        "views": args.views,
        "resolution": [args.size, args.size],
        "diffusion_size": config.diffusion_size,
        "parts": list(PARTS),
        "galp_steps": config.galp.steps,
        "attention_forwards_per_view": config.attention.num_timesteps - 1,
        "slamp_steps": config.slamp.slamp.num_steps,
        "anchor_views": config.anchor_views,
        "edit_steps": config.edit.steps,
        "t5_layers": None if args.tiny else args.t5_layers,
        "max_t5_length": config.diffusion.max_t5_length,
    }

    # model build (random init in place) and its parameter counts
    model = config.diffusion.setup(device=device)
    _, result["build_s"] = timed(model.load)
    result["params_m"] = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in model.model.items()}
    print(f"build: {result['build_s']:.1f} s; parameters (M): {result['params_m']}", flush=True)

    # every prompt the edit will ask for, encoded once; then the text encoders go (RoMaP's code deletes them)
    seg_prompt = segmentation_prompt(BASE_PROMPT, [(p,) for p in PARTS])[0]
    suffixed = [view_prompt(EDIT_PROMPT, a, config.rfds) for a in (0.0, 90.0, 180.0)]
    prompts = ["", seg_prompt, EDIT_PROMPT, config.slamp.slamp.negative_prompt, config.rfds.negative_prompt, *suffixed]
    _, result["prompts_s"] = timed(lambda: model.encode_prompt(prompts))
    result["prompts_encoded"] = len(prompts)
    result["build_prompts_peak_gb"] = peak_gb(device)
    model.release_text_encoders()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"prompts: {len(prompts)} in {result['prompts_s']:.2f} s", flush=True)

    editor = PartEditor(config, scene, views, diffusion=model)

    # warm-ups, timed apart: gsplat's kernels (JIT build on first use) and the first VAE / transformer calls
    def warm_render() -> None:
        probe = scene.detach()
        probe.sh_dc.requires_grad_(True)
        render_scene(probe, views.viewmats[:1], views.Ks[:1], args.size, args.size).rgb.sum().backward()

    def warm_sd3() -> None:
        with torch.no_grad():
            square = torch.rand(1, 3, config.diffusion_size, config.diffusion_size, device=device)
            model.velocity(model.encode_image(square), 0.5, model.empty_prompt())

    _, result["gsplat_warmup_s"] = timed(warm_render)
    _, result["sd3_warmup_s"] = timed(warm_sd3)
    print(f"warm-up: gsplat {result['gsplat_warmup_s']:.1f} s, SD3 {result['sd3_warmup_s']:.1f} s", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # Stage A: 3D-GALP
    with timed_calls(diffusion_sources.AttentionPartTargets, "targets") as target_calls:
        ids, result["segment_s"] = timed(lambda: editor.segment(printer("galp", 100)))
    result["attention_targets_s"] = sum(target_calls)
    result["galp_fit_s"] = result["segment_s"] - result["attention_targets_s"]
    counts = torch.bincount(ids, minlength=len(PARTS) + 1).tolist()
    result["part_gaussians_galp"] = dict(zip(["none", *PARTS], counts))
    print(f"segment: {result['segment_s']:.1f} s (attention targets {result['attention_targets_s']:.1f} s)", flush=True)

    # random weights give arbitrary part maps, so GALP may leave every part (nearly) empty: the edit would then run on
    # an empty 2D mask. Below ``--min-part`` of the Gaussians, the ground-truth labels stand in for the label field
    # (same tensors and code path; only the part's size, hence the 2D mask, differs from GALP's)
    part = args.part
    result["labels"] = "galp"
    if counts[PARTS.index(part) + 1] < args.min_part * scene.num_gaussians:
        editor.label_sh = labels_to_sh(truth, editor.prototypes, config.galp.sh_degree)
        result["labels"] = f"ground truth (GALP gave {part!r} {counts[PARTS.index(part) + 1]} Gaussians)"
    result["edited_part"] = part
    result["edited_part_gaussians"] = int((editor.part_ids() == editor.part_index(part)).sum())

    # Stages B-D: masks, prior removal, SLaMP anchor, masked regularized SDS
    with (
        timed_calls(diffusion_sources.SLaMPTarget, "edit") as slamp_calls,
        timed_calls(part_editor, "run_part_edit") as loop_calls,
        timed_calls(part_editor, "rfds_loss") as guidance_calls,
    ):
        record, result["edit_s"] = timed(lambda: editor.edit(part, EDIT_PROMPT, printer("edit", 50)))
    result["slamp_s"] = sum(slamp_calls)
    result["sds_loop_s"] = sum(loop_calls)
    result["sds_step_ms"] = 1e3 * result["sds_loop_s"] / max(config.edit.steps, 1)
    result["sds_guidance_ms"] = 1e3 * sum(guidance_calls) / max(len(guidance_calls), 1)
    result["edit_other_s"] = result["edit_s"] - result["slamp_s"] - result["sds_loop_s"]
    result["total_edit_s"] = result["segment_s"] + result["edit_s"]
    result["edit_peak_gb"] = peak_gb(device)
    losses = torch.tensor(record.losses)
    result["loss_first_last"] = [float(losses[0]), float(losses[-1])]
    result["nonfinite_losses"] = int((~torch.isfinite(losses)).sum())
    edited = record.scene
    result["edited_scene_finite"] = bool(torch.isfinite(edited.sh_dc).all() and torch.isfinite(edited.means).all())
    print(
        f"edit: {result['edit_s']:.1f} s (SLaMP {result['slamp_s']:.1f} s, loop {result['sds_loop_s']:.1f} s = "
        f"{result['sds_step_ms']:.0f} ms/step); total {result['total_edit_s']:.1f} s",
        flush=True,
    )
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
