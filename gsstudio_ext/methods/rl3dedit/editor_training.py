"""GRPO fine-tuning of the multi-view editor (spec §3.3-3.6): LoRA on FLUX.1-Kontext, rewards from a 3D verifier and an
anchor edit, one GRPO update per sample.

One iteration on a :class:`~gsstudio_ext.methods.rl3dedit.training_samples.TrainingSample`:

1. the 9 source views are tiled into the 3x3 grid at the editor's closest bucket (``grid.views_to_grid``), encoded as
   the condition image; the instruction is rephrased with the release's grid template [C] and encoded;
2. the anchor index a is drawn per sample from the seed (shared by the group) [P: a random anchor per sample];
   the anchor image is a single-view edit of view a (resized to its own closest bucket) by the *reference* editor,
   i.e. the same transformer with its LoRA disabled [I: the paper uses offline single-image Kontext edits], cached
   per sample;
3. ``GRPOTrainer.step``: G rollouts of the policy, reward(rollout) = decode -> split the grid back into 9 views ->
   ``RewardModel(...)["reward"]`` with the anchor view replaced by the anchor image for the verifier [P], then one
   update of the LoRA factors (gradients averaged over ranks under ``torch.distributed``).

:func:`train_editor` runs the updates over a :class:`~gsstudio_ext.methods.rl3dedit.training_samples.SampleSource`,
logs the reward statistics of every update (mean over ranks, plus each rank's sample and reward) to a JSONL file and
saves the LoRA (``models.lora.save_lora``) every ``save_every`` updates and at the end, on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gsstudio_ext.core.atomic import atomic_write
from gsstudio_ext.methods.rl3dedit.grid import (
    GRID_TEMPLATE,
    Resample,
    choose_bucket,
    edit_seed,
    grid_instruction,
    grid_to_views,
    resize_image,
    views_to_grid,
)
from gsstudio_ext.methods.rl3dedit.grpo import GRPOConfig, GRPOTrainer
from gsstudio_ext.methods.rl3dedit.rewards import RewardConfig, RewardModel, SourceReference
from gsstudio_ext.methods.rl3dedit.sde import Rollout
from gsstudio_ext.methods.rl3dedit.training_samples import SampleKey, SampleSource, TrainingSample
from gsstudio_ext.models.flux_kontext import FluxKontextConfig, KontextEditor, KontextEditorConfig
from gsstudio_ext.models.lora import (
    FLUX_LORA_TARGETS,
    attach_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_parameters,
    save_lora,
)

Progress = Callable[[int, int, Dict[str, float]], None]
"""progress(update, total_updates, stats) after every update (rank 0; stats are means over ranks)."""

LOG_NAME = "train_log.jsonl"
LORA_NAME = "lora.safetensors"
CHECKPOINT_DIR = "checkpoints"
_TERMS = ("depth", "point", "pose", "anchor", "lpips")
_PROMPT_BATCH = 16  # instructions per text-encoder call at start-up


def _training_editor() -> KontextEditorConfig:
    return FluxKontextConfig(cpu_offload=False)


@dataclass
class EditorTrainingConfig:
    """RL fine-tuning of the Kontext editor. [P] paper, [C] released code, [I] our choice (unpublished)."""

    editor: KontextEditorConfig = field(default_factory=_training_editor)
    """The editor to fine-tune (FLUX.1-Kontext-dev, bf16, no CPU offload: GRPO needs every part on the GPU); its
    ``lora_path``, when set, is the starting LoRA (same rank and targets) instead of a fresh one."""
    lora_rank: int = 32
    """LoRA rank [P]."""
    lora_alpha: float = 32.0
    """LoRA alpha [P]."""
    lora_targets: Tuple[str, ...] = FLUX_LORA_TARGETS
    """Regexes of the transformer layers that get a LoRA [I: common Flux recipe, see models.lora]."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch [I]."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Group size, denoising steps, SDE noise, MixGRPO window, loss and AdamW settings (see grpo.GRPOConfig)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifier, perceptual distance, normalisation and weights of the reward (see rewards.RewardConfig)."""
    rollout_guidance: float = 2.5
    """Distilled guidance scale during rollouts [I: unpublished; 2.5 as the release's inference, C]."""
    use_template: bool = True
    """Rephrase instructions with the grid template, as the released model was trained [C]."""
    template: str = GRID_TEMPLATE
    """Grid instruction template with an ``{instruction}`` field [C]."""
    resample: Resample = "lanczos"
    """Resampling of the grid, the cells and the anchor view: lanczos (release, PIL) or bicubic [C/I]."""
    exact_cells: bool = False
    """Cut the edited grid into exact cells after a resize instead of the release's integer thirds [I]."""
    anchor_steps: int = 28
    """Denoising steps of the single-view anchor edits [C: the release's inference steps]."""
    anchor_guidance: float = 2.5
    """Guidance of the anchor edits [C]."""
    anchor_base_seed: int = 42
    """Base seed of the anchor edits, XOR-ed with md5 of the instruction [C: the release's seeding]."""
    anchor_cache_size: int = 256
    """Anchor images kept in memory (least recently used dropped) [I]."""
    anchor_cache_dir: Optional[Path] = None
    """Also keep anchor images on disk here (float16 .pt, named by a hash of what they depend on), so a restarted
    run reuses them; None = memory only [I]."""
    release_text_encoders: bool = True
    """Encode every instruction once at the start, then drop CLIP and T5 (about 10 GB for FLUX) [I]."""
    gradient_checkpointing: bool = True
    """Recompute transformer activations in the backward pass (memory for compute) [I]."""
    updates: Optional[int] = None
    """GRPO updates (samples per rank); None = one epoch over the samples, ceil(N / world size) [P: one epoch]."""
    save_every: int = 100
    """Save the LoRA every this many updates (0 = only at the end) [I]."""
    output_dir: Path = Path("outputs/rl3dedit-lora")
    """Folder of lora.safetensors, checkpoints/ and train_log.jsonl."""
    seed: int = 0
    """Seed of the LoRA initialisation (the same on every rank) and of the per-sample anchor indices."""


@dataclass
class TrainingResult:
    """What :func:`train_editor` leaves behind."""

    lora_path: Optional[Path]
    """The final LoRA (rank 0; None on the other ranks)."""
    log_path: Path
    """The JSONL log (written by rank 0)."""
    history: List[Dict[str, float]]
    """This rank's own statistics of every update."""
    editor: KontextEditor
    """The editor with the trained LoRA attached."""


def anchor_index_of(key: SampleKey, num_views: int, seed: int = 0) -> int:
    """The anchor view of a sample, drawn from (seed, key): fixed per sample, independent of rank and epoch."""
    return int(np.random.default_rng([int(seed), 104729, *map(int, key)]).integers(num_views))


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EditorTrainer:
    """The editor with a LoRA, its GRPO trainer, the reward model and the per-sample caches."""

    def __init__(self, config: EditorTrainingConfig, instructions: List[str], device: Union[str, torch.device]) -> None:
        self.config = config
        self.device = torch.device(device)
        prompts = sorted({text for inst in instructions for text in (inst, self.prompt(inst))})
        editor_config = dataclasses.replace(
            config.editor, cache_size=max(config.editor.cache_size, len(prompts)), lora_path=None
        )
        self.editor: KontextEditor = editor_config.setup(device=self.device).load()
        transformer = self.editor.transformer
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(config.seed))  # the same initial LoRA on every rank (rank 0's is broadcast too)
            attach_lora(transformer, config.lora_targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
        if config.editor.lora_path is not None:
            load_lora_state_dict(transformer, config.editor.lora_path)  # continue from a saved LoRA
        if _world()[1] > 1:
            for p in lora_parameters(transformer):
                dist.broadcast(p.data, src=0)
        if config.gradient_checkpointing and getattr(transformer, "_supports_gradient_checkpointing", False):
            transformer.enable_gradient_checkpointing()
        for first in range(0, len(prompts), _PROMPT_BATCH):
            self.editor.encode_prompt(prompts[first : first + _PROMPT_BATCH])
        if config.release_text_encoders:
            self.editor.release_text_encoders()
        self.rewards: RewardModel = config.reward.setup(device=self.device)
        self.trainer = GRPOTrainer(transformer, config.grpo)
        self._anchors: "OrderedDict[SampleKey, Tuple[int, Tensor]]" = OrderedDict()
        self._references: Dict[Tuple[int, int], SourceReference] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        return self.editor.transformer

    def prompt(self, instruction: str) -> str:
        """The prompt the grid edit sees."""
        c = self.config
        return grid_instruction(instruction, c.template) if c.use_template else instruction

    # ---- anchor ------------------------------------------------------------------------------------------------------
    def _anchor_file(self, sample: TrainingSample, index: int) -> Optional[Path]:
        c = self.config
        if c.anchor_cache_dir is None:
            return None
        view = sample.views.images[index]
        ident = repr(
            (sample.scene_name, int(sample.camera_indices[index]), sample.instruction, tuple(view.shape),
             c.anchor_steps, c.anchor_guidance, c.anchor_base_seed, c.resample, repr(c.editor),
             float(view.double().sum()))
        )  # fmt: skip
        return Path(c.anchor_cache_dir) / f"anchor-{hashlib.md5(ident.encode()).hexdigest()}.pt"

    @torch.no_grad()
    def edit_anchor(self, view: Tensor, instruction: str) -> Tensor:
        """Float[3, h, w] single-view edit of ``view`` by the reference editor (LoRA disabled), at the view's size."""
        c = self.config
        h, w = view.shape[-2:]
        bw, bh = choose_bucket(w, h, self.editor.buckets())
        source = resize_image(view.float().cpu(), (bh, bw), c.resample).to(self.device)
        seed = edit_seed(instruction, c.anchor_base_seed)
        with lora_disabled(self.transformer):
            edited = self.editor.edit(source, instruction, steps=c.anchor_steps, guidance=c.anchor_guidance, seed=seed)
        return resize_image(edited.float().cpu(), (h, w), c.resample)

    def anchor(self, sample: TrainingSample) -> Tuple[int, Tensor]:
        """(anchor index, Float[3, h, w] anchor image) of ``sample``, cached."""
        if sample.key in self._anchors:
            self._anchors.move_to_end(sample.key)
            return self._anchors[sample.key]
        index = anchor_index_of(sample.key, len(sample.views), self.config.seed)
        path = self._anchor_file(sample, index)
        if path is not None and path.is_file():
            image = torch.load(path, map_location="cpu", weights_only=True).float()
        else:
            image = self.edit_anchor(sample.views.images[index], sample.instruction)
            if path is not None:  # float16 on disk; the same rounding in memory, so a restart sees the same image
                image = image.half().float()
                atomic_write(path, lambda handle: torch.save(image.half(), handle))
        self._anchors[sample.key] = (index, image)
        while len(self._anchors) > max(1, self.config.anchor_cache_size):
            self._anchors.popitem(last=False)
        return index, image

    def reference(self, sample: TrainingSample) -> SourceReference:
        """The verifier's confidences of the unedited views (ratio normalisation), cached per view set."""
        key = (sample.key.scene, sample.key.view_set)
        if key not in self._references:
            self._references[key] = self.rewards.reference(sample.views)
        return self._references[key]

    # ---- one iteration -----------------------------------------------------------------------------------------------
    def step(self, sample: TrainingSample) -> Dict[str, float]:
        """One GRPO update on ``sample``; returns the trainer's statistics plus the mean reward terms."""
        c = self.config
        views = sample.views
        anchor_index, anchor_image = self.anchor(sample)
        reference = self.reference(sample) if c.reward.normalization == "ratio" else None
        with torch.no_grad():
            grid, _ = views_to_grid(views.images.float(), self.editor.buckets(), c.resample)
            cond = self.editor.encode_image(grid[None].to(self.device))
        embeds = self.editor.encode_prompt([self.prompt(sample.instruction)])
        policy = self.editor.policy(cond, embeds, c.rollout_guidance)
        view_size = (int(views.images.shape[-2]), int(views.images.shape[-1]))
        terms: Dict[str, Tensor] = {}

        def reward(group: Rollout) -> Tensor:
            edited = grid_to_views(group.images.float(), view_size, c.resample, c.exact_cells)
            out = self.rewards(edited, anchor_index, anchor_image, views, reference)
            terms.update(out)
            return out["reward"]

        stats = self.trainer.step(policy, reward)
        for name in _TERMS:
            if name in terms:
                stats[name] = float(terms[name].float().mean())
        stats["reward_min"] = float(terms["reward"].min())
        stats["reward_max"] = float(terms["reward"].max())
        stats["anchor_index"] = float(anchor_index)
        return stats


# ======================================================================================================================
# the loop
# ======================================================================================================================
def _gather(values: List[float], device: torch.device) -> Tensor:
    """Float64[world, K]: every rank's ``values`` (one row per rank)."""
    _, world = _world()
    row = torch.tensor(values, dtype=torch.float64)
    if world == 1:
        return row[None]
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    rows = [torch.zeros_like(row, device=comm) for _ in range(world)]
    dist.all_gather(rows, row.to(comm))
    return torch.stack([r.cpu() for r in rows])


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def train_editor(
    config: EditorTrainingConfig,
    samples: SampleSource,
    progress: Optional[Progress] = None,
    device: Union[str, torch.device, None] = None,
) -> TrainingResult:
    """Fine-tune the editor's LoRA with GRPO on ``samples`` (this rank's share of them); see the module docstring.

    Under ``torch.distributed`` every rank calls this with its own rank-aware source; the LoRA starts identical on all
    ranks and every update averages the gradients, so the ranks stay identical. Rank 0 writes
    ``<output_dir>/train_log.jsonl`` (one line per update), ``checkpoints/lora-<update>.safetensors`` every
    ``save_every`` updates and ``lora.safetensors`` at the end.
    """
    rank, world = _world()
    if samples.world_size != world or samples.rank != rank:
        raise ValueError(f"the sample source is for rank {samples.rank} of {samples.world_size}, not {rank} of {world}")
    device = torch.device(device or "cpu")
    out = Path(config.output_dir)
    log_path = out / LOG_NAME
    worker = EditorTrainer(config, [inst.text for inst in samples.instructions], device)
    total = int(config.updates) if config.updates is not None else samples.updates_per_epoch
    log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w", encoding="utf-8")
    history: List[Dict[str, float]] = []
    stream = samples.stream()
    try:
        for update in range(1, total + 1):
            start = time.perf_counter()
            sample = next(stream)
            stats = worker.step(sample)
            history.append(dict(stats))
            names = sorted(stats)
            key = list(sample.key)
            rows = _gather([stats[n] for n in names] + key, device)
            if rank != 0:
                continue
            means = {n: float(torch.nanmean(rows[:, i]).item()) for i, n in enumerate(names) if n != "anchor_index"}
            record = {
                "update": update,
                "world_size": world,
                "seconds": round(time.perf_counter() - start, 4),
                **{n: _finite_or_none(v) for n, v in means.items()},
                "ranks": [
                    {
                        "scene": samples.scenes[int(r[len(names)])].name,
                        "sample": [int(v) for v in r[len(names) :]],
                        "anchor_index": int(r[names.index("anchor_index")]),
                        "reward_mean": _finite_or_none(float(r[names.index("reward_mean")])),
                    }
                    for r in rows
                ],
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if config.save_every > 0 and update % config.save_every == 0 and update < total:
                save_lora(worker.transformer, out / CHECKPOINT_DIR / f"lora-{update:06d}.safetensors")
            if progress is not None:
                progress(update, total, means)
    finally:
        if log is not None:
            log.close()
    lora_path = save_lora(worker.transformer, out / LORA_NAME) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return TrainingResult(lora_path, log_path, history, worker.editor)
