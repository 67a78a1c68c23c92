"""The registered method through nerfstudio's own command-line tools on CPU: ns-train, ns-eval, ns-render."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def run_config(default_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ns_train")
    run(
        "ns-train", "gsstudio-splatfacto", "--data", str(default_scene), "--output-dir", str(out),
        "--max-num-iterations", "10", "--vis", "tensorboard", "--timestamp", "run",
        "--pipeline.model.feature-dims", "feature", "13",
    )  # fmt: skip
    (config,) = out.glob("*/gsstudio-splatfacto/run/config.yml")
    return config


@pytest.mark.slow
def test_ns_train_writes_a_reloadable_run(run_config: Path):
    assert sorted(p.name for p in (run_config.parent / "nerfstudio_models").iterdir()) == ["step-000000009.ckpt"]


@pytest.mark.slow
def test_ns_eval_writes_metrics_json(run_config: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    run("ns-eval", "--load-config", str(run_config), "--output-path", str(out))
    report = json.loads(out.read_text())
    assert report["method_name"] == "gsstudio-splatfacto"
    assert {"psnr", "psnr_std", "ssim", "fps"} <= set(report["results"])
    assert "lpips" not in report["results"]


@pytest.mark.slow
def test_ns_render_dataset_writes_named_outputs(run_config: Path, tmp_path: Path):
    run(
        "ns-render", "dataset", "--load-config", str(run_config), "--output-path", str(tmp_path),
        "--split", "test", "--rendered-output-names", "rgb", "depth", "feature",
    )  # fmt: skip
    for name in ("rgb", "depth", "feature"):
        assert len(list((tmp_path / "test" / name).glob("*"))) == 8, name
