"""Result container shared by the evaluation protocols, its atomic JSON file and a rich table.

JSON layout (every protocol)::

    {"protocol": "<name>", "metrics": {<metric>: mean over scenes}, "settings": {...},
     "scenes": {"<scene>": {"metrics": {...}, "num_rows": N, "rows": [{per-pair row}, ...]}}}

Scene averages are the plain mean of the per-scene numbers (as the LERF papers report them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

from rich.table import Table

from gsstudio_ext.core.atomic import write_json_atomic

__all__ = ["SceneResult", "ProtocolResult", "write_json_atomic"]


@dataclass
class SceneResult:
    """Metrics and per-pair rows of one scene."""

    scene: str
    """Scene name."""
    metrics: Dict[str, float]
    """Metric name -> value for this scene."""
    rows: List[Dict[str, Any]] = field(default_factory=list)
    """One JSON-ready dict per scored (frame, query) pair."""
    info: Dict[str, Any] = field(default_factory=dict)
    """Counts and notes (missing predictions, unmatched files ...)."""


@dataclass
class ProtocolResult:
    """Results of one evaluation protocol over one or more scenes."""

    protocol: str
    """Protocol name, e.g. "opengaussian-lerf" or "langsplat-lerf"."""
    metric_names: Sequence[str]
    """Metric keys, in display order."""
    scenes: List[SceneResult] = field(default_factory=list)
    """Per-scene results."""
    settings: Dict[str, Any] = field(default_factory=dict)
    """Protocol parameters used (thresholds, ratios ...)."""

    @property
    def metrics(self) -> Dict[str, float]:
        """Mean over scenes of each metric (NaN when there is no scene)."""
        out = {}
        for name in self.metric_names:
            values = [s.metrics[name] for s in self.scenes]
            out[name] = sum(values) / len(values) if values else math.nan
        return out

    def scene(self, name: str) -> SceneResult:
        """The result of scene ``name``."""
        for s in self.scenes:
            if s.scene == name:
                return s
        raise KeyError(f"no scene {name!r} in this result; scenes: {[s.scene for s in self.scenes]}")

    def flat_metrics(self) -> Dict[str, float]:
        """{"<protocol>/<metric>": mean, "<protocol>/<scene>/<metric>": value} for ns-eval style dicts."""
        out = {f"{self.protocol}/{k}": v for k, v in self.metrics.items()}
        for s in self.scenes:
            out.update({f"{self.protocol}/{s.scene}/{k}": v for k, v in s.metrics.items()})
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {
            "protocol": self.protocol,
            "metrics": self.metrics,
            "settings": dict(self.settings),
            "scenes": {
                s.scene: {
                    "metrics": dict(s.metrics),
                    "info": dict(s.info),
                    "num_rows": len(s.rows),
                    "rows": list(s.rows),
                }
                for s in self.scenes
            },
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the JSON atomically (temp file, then rename); returns the path."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ProtocolResult":
        if "protocol" not in data or "scenes" not in data:
            raise ValueError("not an evaluation result: missing 'protocol' or 'scenes'")
        scenes = [
            SceneResult(name, dict(s["metrics"]), list(s.get("rows", [])), dict(s.get("info", {})))
            for name, s in data["scenes"].items()
        ]
        return cls(data["protocol"], list(data.get("metrics", {})), scenes, dict(data.get("settings", {})))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ProtocolResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def merge(cls, results: Iterable["ProtocolResult"]) -> "ProtocolResult":
        """Join single-scene results of the same protocol into one multi-scene result."""
        results = list(results)
        if not results:
            raise ValueError("nothing to merge")
        first = results[0]
        scenes: List[SceneResult] = []
        for r in results:
            if r.protocol != first.protocol:
                raise ValueError(f"cannot merge protocols {first.protocol!r} and {r.protocol!r}")
            scenes.extend(r.scenes)
        names = [s.scene for s in scenes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate scene names in merge: {names}")
        return cls(first.protocol, list(first.metric_names), scenes, dict(first.settings))

    def table(self) -> Table:
        """A rich table: one row per scene plus the mean."""
        table = Table(title=f"{self.protocol}")
        table.add_column("scene")
        for name in self.metric_names:
            table.add_column(name, justify="right")
        table.add_column("pairs", justify="right")
        for s in self.scenes:
            table.add_row(s.scene, *[_fmt(s.metrics[n]) for n in self.metric_names], str(len(s.rows)))
        if len(self.scenes) > 1:
            mean = self.metrics
            total = sum(len(s.rows) for s in self.scenes)
            table.add_row("mean", *[_fmt(mean[n]) for n in self.metric_names], str(total), style="bold")
        return table


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"
