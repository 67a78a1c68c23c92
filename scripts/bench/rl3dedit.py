"""rl3dedit-ext: wall time of one RL3DEdit single-pass edit (spec §3.1-3.3, §3.7): render 9 views, edit them in one
3x3-grid pass of the full-size black-forest-labs/FLUX.1-Kontext-dev architecture, refit the Gaussians (3,000 steps).

The Kontext provider is a ``KontextEditor`` built from full-size configs written below, with random weights (the same
compute as the real ones), in bf16 and created directly on the GPU: the FLUX transformer (19 double-stream + 38
single-stream blocks, 24 heads x 128, RoPE axes (16, 56, 56), guidance embedding; 11.9 B parameters), the FLUX VAE
(16 latent channels, scale 0.3611, shift 0.1159), CLIP-L and the T5-XXL encoder (4.7 B; ``--t5-layers`` can shorten
it: the prompt is encoded once, before the edit). Tokenizers are built locally (no hub); the vocabulary size only
changes the embedding tables, not the compute. Everything stays on the GPU (no model CPU offload, which the RL3DEdit
release turns on to fit 24-32 GB cards).

The scene is romap.py's snowman: ``--gaussians`` surface Gaussians (SH degree 3) seen by ``--views`` ring cameras at
``--size`` x ``--size``. Everything else is the plugin's defaults: ``SinglePassEdit`` picks 9 views at equal azimuth
steps, tiles them into a 3x3 grid resized (Lanczos) to the closest Kontext bucket (1024 x 1024 for square views),
runs 28 Euler steps at distilled guidance 2.5, cuts ~341 px cells and refits every Gaussian for 3,000 steps of
L1 + 0.2 D-SSIM on the edited cells with 3DGS's densification.

Timed (CUDA-synchronised wall clock): ``build_s`` (random init of every module), ``prompts_s`` (the grid instruction
through CLIP-L and T5-XXL, then the text encoders released), the edit's stages as ``SinglePassEdit`` reports them
(``render_s``, ``edit_s``, ``refit_s``) with ``end_to_end_s = render_s + edit_s + refit_s``, and inside them
``transformer_step_ms`` (one Kontext forward over the 4,096 generated + 4,096 condition + 512 text tokens),
``vae_encode_s``, ``vae_decode_s``, ``grid_other_s`` (tiling and Lanczos resampling on the CPU) and
``refit_step_ms``. Warm-ups (gsplat kernels, the first Kontext call) are timed apart.

    python scripts/bench/rl3dedit.py --out rl3dedit.json                    # GPU, full size
    OMP_NUM_THREADS=1 python scripts/bench/rl3dedit.py --tiny               # CPU smoke test with a tiny Kontext
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Type

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from romap import CLIP_L, T5_XXL, building_on, peak_gb, printer, ring_views, snowman_scene, timed, timed_calls  # noqa: E402

from gsstudio_ext.models.flux_kontext import KontextEditor, KontextEditorConfig  # noqa: E402
from gsstudio_ext.models.sd3_tiny import TINY_WORDS, tiny_tokenizer  # noqa: E402

INSTRUCTION = "Give the snowman a golden hat"
PUBLISHED_S = {"rl3dedit": 90.0, "dge": 240.0, "gaussctrl": 720.0}
"""Published edit times on an RTX Pro 6000 (spec §3.9): RL3DEdit 1.5 min, DGE 4 min, GaussCtrl 12 min."""

# black-forest-labs/FLUX.1-Kontext-dev, the configs of its transformer and vae subfolders
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


@dataclass
class RandomFluxKontextConfig(KontextEditorConfig):
    """FLUX.1-Kontext-dev's architecture with seeded random weights and local tokenizers (benchmarks: same compute)."""

    _target: Type = field(default_factory=lambda: RandomFluxKontextEditor)
    dtype: str = "bfloat16"
    """Weights and activations (the RL3DEdit release runs Kontext in bf16)."""
    t5_layers: int = 24
    """T5-XXL encoder blocks (24 = full size); prompt encoding only."""
    words: Tuple[str, ...] = TINY_WORDS + ("snowman", "hat", "golden", "grid", "views", "scene", "scale", "across")
    """Whole-word tokenizer vocabulary; other words split into letters."""
    seed: int = 0
    """Seed of the random weights."""


class RandomFluxKontextEditor(KontextEditor):
    config: RandomFluxKontextConfig

    def _build(self) -> Tuple[Dict[str, torch.nn.Module], List[Any]]:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        c = self.config
        clip_tok = tiny_tokenizer(c.words, "<|startoftext|>", "<|endoftext|>", "<pad>", 77)
        t5_tok = tiny_tokenizer(c.words, None, "</s>", "<pad>", c.max_sequence_length)
        ids = dict(
            pad_token_id=clip_tok.pad_token_id, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id
        )
        t5 = dict(T5_XXL, num_layers=c.t5_layers)
        t5_ids = dict(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0)
        torch.manual_seed(c.seed)
        with building_on(self.device, self.dtype):
            modules = {
                "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
                "vae": AutoencoderKL(**FLUX_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
                "text_encoder_2": T5EncoderModel(T5Config(**t5, **t5_ids)),
            }
        return modules, [clip_tok, t5_tok]


@contextmanager
def peak_at_entry(owner: Any, name: str, store: Dict[str, Any], key: str, device: str) -> Iterator[None]:
    """While active, a call of ``owner.name`` first records the peak GPU memory so far under ``store[key]`` and resets
    the peak counter (so the peak of what runs inside the call can be read afterwards)."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        store[key] = peak_gb(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=300_000)
    parser.add_argument("--views", type=int, default=24, help="training cameras on the ring (9 are edited)")
    parser.add_argument("--size", type=int, default=512, help="view side in pixels")
    parser.add_argument("--steps", type=int, default=None, help="Kontext steps; default: GridEditConfig.steps (28)")
    parser.add_argument("--refit-steps", type=int, default=None, help="default: RefitConfig.steps (3000)")
    parser.add_argument("--t5-layers", type=int, default=24, help="T5-XXL encoder blocks (24 = full)")
    parser.add_argument("--instruction", default=INSTRUCTION)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Kontext, 64x64, few refit steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"

    from gsstudio_ext.core.scene_render import render_scene
    from gsstudio_ext.methods.rl3dedit import single_pass
    from gsstudio_ext.methods.rl3dedit.grid import choose_bucket, grid_instruction
    from gsstudio_ext.methods.rl3dedit.single_pass import SinglePassConfig, SinglePassEdit
    from gsstudio_ext.methods.rl3dedit.view_editors import KontextGridEditorConfig
    from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig

    config = SinglePassConfig()
    if args.tiny:
        args.gaussians, args.views, args.size = min(args.gaussians, 3000), min(args.views, 12), 64
        config.kontext = KontextGridEditorConfig(kontext=TinyFluxKontextConfig())
        config.kontext.grid.steps = 4
        config.refit.steps, config.refit.densify_from, config.refit.densify_every = 30, 10, 10
    else:
        config.kontext = KontextGridEditorConfig(kontext=RandomFluxKontextConfig(t5_layers=args.t5_layers))
    if args.steps is not None:
        config.kontext.grid.steps = args.steps
    if args.refit_steps is not None:
        config.refit.steps = args.refit_steps
    grid = config.kontext.grid

    gen = torch.Generator().manual_seed(0)
    scene, _ = snowman_scene(args.gaussians, gen)
    scene = scene.to(device)
    cameras = ring_views(args.views, args.size, device)
    result: Dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny FLUX.1-Kontext (random)" if args.tiny else "FLUX.1-Kontext-dev architecture (random, bf16)",
        "gaussians": scene.num_gaussians,
        "sh_degree": scene.sh_degree,
        "cameras": args.views,
        "resolution": [args.size, args.size],
        "edited_views": config.num_views,
        "kontext_steps": grid.steps,
        "guidance": grid.guidance,
        "resample": grid.resample,
        "refit_steps": config.refit.steps,
        "refit_densify": config.refit.densify,
        "t5_layers": None if args.tiny else args.t5_layers,
        "max_t5_length": config.kontext.kontext.max_sequence_length,
        "cpu_offload": config.kontext.kontext.cpu_offload,
        "instruction": args.instruction,
    }

    # model build (random init in place) and its parameter counts
    editor = config.view_editor(device)
    kontext: KontextEditor = editor.kontext
    _, result["build_s"] = timed(kontext.load)
    result["params_m"] = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in kontext.model.items()}
    print(f"build: {result['build_s']:.1f} s; parameters (M): {result['params_m']}", flush=True)

    # the grid instruction, encoded once (the edit finds it in the cache); then the text encoders go
    prompt = grid_instruction(args.instruction, grid.template) if grid.use_template else args.instruction
    embeds, result["prompts_s"] = timed(lambda: kontext.encode_prompt([prompt]))
    result["prompt"] = prompt
    result["build_prompts_peak_gb"] = peak_gb(device)
    kontext.release_text_encoders()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"prompt: encoded in {result['prompts_s']:.2f} s", flush=True)

    # warm-ups, timed apart: gsplat's kernels (JIT build on first use) and a first VAE + transformer call on the grid
    bucket_w, bucket_h = choose_bucket(3 * args.size, 3 * args.size, kontext.buckets())
    result["grid_size"] = [bucket_h, bucket_w]

    def warm_render() -> None:
        probe = scene.detach()
        probe.sh_dc.requires_grad_(True)
        render_scene(probe, cameras.viewmats[:1], cameras.Ks[:1], args.size, args.size).rgb.sum().backward()

    def warm_kontext() -> None:
        with torch.no_grad():
            cond = kontext.encode_image(torch.rand(1, 3, bucket_h, bucket_w, device=device))
            velocity = kontext.velocity(kontext.initial_noise(cond.size), cond, 1.0, embeds)
            kontext.decode(velocity, cond.size)

    _, result["gsplat_warmup_s"] = timed(warm_render)
    _, result["kontext_warmup_s"] = timed(warm_kontext)
    print(f"warm-up: gsplat {result['gsplat_warmup_s']:.1f} s, Kontext {result['kontext_warmup_s']:.1f} s", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # the edit: select + render, one grid edit, refit
    edit = SinglePassEdit(config, scene, cameras, background=None, editor=editor)
    memory: Dict[str, Any] = {}
    with (
        timed_calls(KontextEditor, "velocity") as step_calls,
        timed_calls(KontextEditor, "encode_image") as encode_calls,
        timed_calls(KontextEditor, "decode") as decode_calls,
        peak_at_entry(single_pass, "refit_scene", memory, "edit_peak_gb", device),
    ):
        start = time.perf_counter()
        out = edit.run(args.instruction, printer("refit", 500))
        wall = time.perf_counter() - start
    timings = out.timings
    result["render_s"], result["edit_s"], result["refit_s"] = timings["render"], timings["edit"], timings["refit"]
    result["end_to_end_s"] = timings["render"] + timings["edit"] + timings["refit"]
    result["end_to_end_with_prompt_s"] = result["end_to_end_s"] + result["prompts_s"]
    result["run_wall_s"] = wall
    result["transformer_steps"] = len(step_calls)
    result["transformer_step_ms"] = 1e3 * statistics.median(step_calls)
    result["transformer_step_ms_mean"] = 1e3 * statistics.fmean(step_calls)
    result["transformer_total_s"] = sum(step_calls)
    result["vae_encode_s"] = sum(encode_calls)
    result["vae_decode_s"] = sum(decode_calls)
    result["grid_other_s"] = result["edit_s"] - result["transformer_total_s"] - sum(encode_calls) - sum(decode_calls)
    result["refit_step_ms"] = 1e3 * result["refit_s"] / max(config.refit.steps, 1)
    result["edit_peak_gb"] = memory.get("edit_peak_gb")
    result["refit_peak_gb"] = peak_gb(device)
    result["view_indices"] = out.view_indices.tolist()
    result["edited_cell_size"] = list(out.edited.images.shape[-2:])
    result["gaussians_after_refit"] = out.scene.num_gaussians
    losses = torch.tensor(out.losses)
    result["refit_loss_first_last"] = [float(losses[0]), float(losses[-1])]
    result["nonfinite_losses"] = int((~torch.isfinite(losses)).sum())
    result["edited_scene_finite"] = bool(
        torch.isfinite(out.scene.sh_dc).all() and torch.isfinite(out.scene.means).all()
    )
    result["speedup_vs_published"] = {k: v / result["end_to_end_s"] for k, v in PUBLISHED_S.items()}
    print(
        f"edit: render {result['render_s']:.2f} s, grid edit {result['edit_s']:.1f} s "
        f"({result['transformer_steps']} x {result['transformer_step_ms']:.0f} ms), refit {result['refit_s']:.1f} s "
        f"({result['refit_step_ms']:.1f} ms/step); end to end {result['end_to_end_s']:.1f} s",
        flush=True,
    )
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
