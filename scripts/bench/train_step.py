"""Training step time of the gsstudio base model vs nerfstudio's plain splatfacto on the same scene and device.

All variants are set up with nerfstudio's Trainer, then stepped round-robin (one iteration of each in turn), so
slow drifts of the machine affect every variant alike. An iteration is what Trainer.train runs per step: the
callbacks before, train_iteration (data, forward, backward, optimizer), the callbacks after (densification).

    python scripts/bench/train_step.py --data path/to/scene --steps 2000 --warmup 200 --out train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _no_lpips() -> None:
    """splatfacto builds an LPIPS metric whose weights download at construction; the bench machine has no network.
    LPIPS is only used in evaluation, which this benchmark never runs, so a stand-in is installed."""
    import torchmetrics.image.lpip as lpip

    class _NoLPIPS(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    lpip.LearnedPerceptualImagePatchSimilarity = _NoLPIPS


def _variants(feature_dim: int, only: list):
    from nerfstudio.configs.method_configs import method_configs

    from gsstudio_ext.methods.base.model import FeatureSplatfactoModelConfig
    from gsstudio_ext.methods.base.trainer_config import gaussian_trainer_config

    variants = {
        "splatfacto": method_configs["splatfacto"],
        "gsstudio-base": gaussian_trainer_config("gsstudio-base", FeatureSplatfactoModelConfig()),
        f"gsstudio-base+{feature_dim}ch": gaussian_trainer_config(
            f"gsstudio-base-{feature_dim}",
            FeatureSplatfactoModelConfig(feature_dims={"feature": feature_dim}),
            extra_lrs={"feature": 0.0025},
        ),
    }
    variants["ag2aussian-ext"] = _ag2_variant()
    return {name: config for name, config in variants.items() if not only or name in only}


def _ag2_variant():
    """ag2aussian-ext with every per-step loss on from step 0 (mask smoothness + contrast on the instance masks,
    depth distortion, alpha, child regulariser) and the anchor-graph Laplacian from step 1000 (after growth)."""
    from gsstudio_ext.methods.ag2aussian.config import ag2_trainer_config
    from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig

    model = AG2ModelConfig(
        mask_loss_from=0, distortion_from=0, alpha_from=0, densify_until=1000, graph_from=1000, background_mask=True
    )
    return ag2_trainer_config(model)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _iteration(trainer, step: int) -> float:
    """One Trainer.train iteration; returns its wall time in seconds."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    _sync()
    start = time.perf_counter()
    trainer.pipeline.train()
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(step)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    _sync()
    return time.perf_counter() - start


def _profile(trainer, first_step: int, steps: int) -> None:
    """Print the ops that take the most host time over a few extra iterations."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for step in range(first_step, first_step + steps):
            _iteration(trainer, step)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="nerfstudio dataset (e.g. written by gs-synth)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="untimed first steps")
    parser.add_argument("--feature-dim", type=int, default=13, help="feature channels of the third variant")
    parser.add_argument("--variants", nargs="*", default=[], help="subset of variants to run (default: all)")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many extra steps per variant")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    _no_lpips()
    from gsstudio_ext.methods.base.training import prepare_config

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, config in _variants(args.feature_dim, args.variants).items():
            config = prepare_config(config, args.data, Path(tmp) / name, max_steps=args.steps)
            config.pipeline.datamanager.cache_images = "gpu" if torch.cuda.is_available() else "cpu"
            config.pipeline.model.num_downscales = 0  # time full-resolution steps from the start
            trainers[name] = config.setup(local_rank=0, world_size=1)
            trainers[name].setup()
        times = {name: [] for name in trainers}
        for step in range(args.steps):
            for name, trainer in trainers.items():
                elapsed = _iteration(trainer, step)
                if step >= args.warmup:
                    times[name].append(elapsed)
        for name, trainer in trainers.items():
            if args.profile_steps:
                print(f"--- profile of {name}", flush=True)
                _profile(trainer, args.steps, args.profile_steps)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "data": str(args.data),
        "steps": args.steps,
        "warmup": args.warmup,
        "median_ms": medians,
        "mean_ms": {name: 1e3 * statistics.fmean(t) for name, t in times.items()},
        "gaussians": {name: int(trainer.pipeline.model.num_points) for name, trainer in trainers.items()},
        "ratios_vs_splatfacto": (
            {name: ms / medians["splatfacto"] for name, ms in medians.items()} if "splatfacto" in medians else {}
        ),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
