"""rtgs2-ext under torch.distributed: two CPU processes (gloo) wrap the model in DistributedDataParallel, sample
different views, and end every Stage-A and Stage-B backward with identical (averaged) gradients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rtgs2_tiny import tiny_model  # tests/ is on sys.path (conftest's folder)

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, data: str, store: str, out: str) -> None:
    from gsstudio_ext.methods.rtgs2.datamanager import MultiSceneDataManagerConfig
    from gsstudio_ext.methods.rtgs2.pipeline import RTGS2PipelineConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    index = json.loads((Path(data) / "scenes.json").read_text())
    train = tuple(scene["name"] for scene in index["scenes"] if scene["split"] == "train")[:2]
    config = RTGS2PipelineConfig(
        datamanager=MultiSceneDataManagerConfig(data=Path(data), train_scenes=train),
        model=tiny_model(ssl_steps=1, batch_size=2),
        cache_renders=False,  # render only the sampled views
    )
    pipeline = config.setup(device="cpu", test_mode="val", world_size=world, local_rank=rank)
    results = {}
    for step, name in ((0, "backbone"), (1, "fusion")):
        pipeline.model.zero_grad(set_to_none=True)
        _, losses, _ = pipeline.get_train_loss_dict(step)
        sum(losses.values()).backward()
        module = getattr(pipeline.model, name)
        results[name] = torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])
        results[name + "_loss"] = float(sum(losses.values()))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_averages_gradients_across_ranks(rtgs2_scenes: Path, tmp_path: Path) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_worker, args=(2, str(rtgs2_scenes), str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("backbone", "fusion"):
        assert ranks[0][name].numel() > 0 and ranks[0][name].abs().sum() > 0
        assert torch.allclose(ranks[0][name], ranks[1][name], atol=1e-6), name
    # the ranks saw different samples (different seeds), so their losses differ while their gradients agree
    assert ranks[0]["fusion_loss"] != ranks[1]["fusion_loss"]
