"""What a comparison knows about each run: its record, its checkpoints, its pruning.json, and the per-row numbers.

A run is one `ns-train` run (or one checkpoint of it) evaluated on the eval views; a row is a line of the table,
holding one run per seed. Rows are summarised as mean ± half the range over seeds.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

SCORED_LINE = re.compile(r"scored \d+ Gaussians in ([0-9.]+) s")
SPREAD = "half the range over seeds, (max - min) / 2"


@dataclass
class RunRecord:
    label: str
    row: str
    method: str
    seed: int
    config: Path
    step: Optional[int] = None
    """The checkpoint evaluated (nerfstudio's step index: steps trained - 1); None: the run's latest."""
    baseline: Optional[str] = None
    """The row this run is read against ('x fewer' is relative to it, same seed)."""
    job: Optional[str] = None
    train_seconds: Optional[float] = None
    scoring_seconds: Optional[float] = None
    scoring_source: Optional[str] = None
    kl_weight: Optional[float] = None
    target_fraction: Optional[float] = None
    gate: Optional[dict] = None
    pruning: Optional[dict] = None
    eval_config: Optional[Path] = None
    metrics: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "job"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def absolute_scene(scene: str) -> str:
    """The scene as results.json records it and --merge compares it: 'default', or an absolute path (a path as typed
    is relative to the folder the comparison ran in, and tables made from other folders must still merge)."""
    return scene if scene == "default" else str(Path(scene).resolve())


# -- checkpoints ---------------------------------------------------------------------------------------------------
def checkpoint_steps(config: Path) -> List[int]:
    folder = config.parent / "nerfstudio_models"
    steps = []
    for path in folder.glob("step-*.ckpt"):
        try:
            steps.append(int(path.stem.split("-", 1)[1]))
        except ValueError:
            pass
    return sorted(steps)


def checkpoint_path(config: Path, step: int) -> Path:
    return config.parent / "nerfstudio_models" / f"step-{step:09d}.ckpt"


def last_checkpoint(config: Path) -> Path:
    steps = checkpoint_steps(config)
    if not steps:
        raise FileNotFoundError(f"no checkpoint next to {config}")
    return checkpoint_path(config, steps[-1])


def config_at_step(config: Path, step: int, out: Path) -> Path:
    """A copy of a run's config.yml that makes eval_setup (ns-eval, ns-export) load checkpoint `step` instead of the
    latest; the checkpoint folder it names is still the run's own."""
    import yaml

    from nerfstudio.engine.trainer import TrainerConfig  # noqa: F401  (the classes the yaml names)

    loaded = yaml.load(config.read_text(), Loader=yaml.Loader)
    loaded.load_step = step
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.dump(loaded))
    return out


# -- pruning.json ----------------------------------------------------------------------------------------------------
def read_pruning_file(config: Path) -> Optional[dict]:
    """The pruning.json pup-gs and vedal-gs write next to config.yml, or None (older runs, or unreadable)."""
    path = config.parent / "pruning.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def scoring_from_pruning_file(data: dict) -> Optional[float]:
    try:
        if data.get("method") == "pup-gs" or "rounds" in data:
            return float(sum(float(r["scoring_seconds"]) for r in data["rounds"]))
        if data.get("method") == "vedal-gs" or "importance_seconds" in data:
            return float(data["importance_seconds"])
    except (KeyError, TypeError, ValueError):
        return None
    return None


def attach_scoring(record: RunRecord, log: Optional[Path]) -> None:
    """Scoring time (and vedal-gs's gate counts) from the run's pruning.json, or from its log for older runs."""
    if record.method not in ("pup-gs", "vedal-gs"):
        return
    data = read_pruning_file(record.config)
    if data is not None:
        record.pruning = data
        seconds = scoring_from_pruning_file(data)
        if seconds is not None:
            record.scoring_seconds, record.scoring_source = seconds, "pruning.json"
        gate = data.get("gate")
        if isinstance(gate, dict):
            record.gate = {k: gate[k] for k in ("eligible_fraction", "grants", "reversals") if k in gate}
        if seconds is not None:
            return
    if log is not None and log.is_file():
        scoring = [float(x) for x in SCORED_LINE.findall(log.read_text(errors="replace"))]
        if scoring:
            record.scoring_seconds, record.scoring_source = sum(scoring), "log"


# -- rows ----------------------------------------------------------------------------------------------------------
# (key, header, format); the value of a key is a metric, or a record attribute, or x_fewer.
COLUMNS = [("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".3f"), ("lpips", "LPIPS", ".3f"),
           ("num_gaussians", "Gaussians", ".0f"), ("target_gaussians", "asked", ".0f"), ("x_fewer", "x fewer", ".2f"), ("ply_mb", "PLY MB", ".2f"),
           ("render_ms", "render ms", ".1f"), ("fps", "FPS", ".1f"), ("train_seconds", "train s", ".0f"),
           ("scoring_seconds", "scoring s", ".1f")]


def record_value(record: RunRecord, key: str) -> Optional[float]:
    if key in ("train_seconds", "scoring_seconds"):
        return getattr(record, key)
    if key == "target_gaussians":
        # The size a target row asked for, as the run resolved it (pruning.json); the table's 'Gaussians' is what it got.
        asked = (record.pruning or {}).get("target_gaussians")
        return float(asked) if isinstance(asked, (int, float)) else None
    return record.metrics.get(key)


def rows_of(records: List[RunRecord]) -> Dict[str, List[RunRecord]]:
    rows: Dict[str, List[RunRecord]] = {}
    for r in records:
        rows.setdefault(r.row, []).append(r)
    return rows


def add_x_fewer(records: List[RunRecord]) -> None:
    """x fewer = the baseline row's Gaussian count over this run's, for the same seed."""
    by_row_seed = {(r.row, r.seed): r for r in records}
    for r in records:
        base = by_row_seed.get((r.baseline, r.seed)) if r.baseline else None
        if base is not None and r.metrics.get("num_gaussians"):
            r.metrics["x_fewer"] = base.metrics["num_gaussians"] / r.metrics["num_gaussians"]


def aggregate(values: List[Optional[float]]) -> Optional[dict]:
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not present:
        return None
    return {"mean": statistics.fmean(present), "spread": (max(present) - min(present)) / 2, "n": len(present),
            "values": present}


def aggregates(records: List[RunRecord]) -> Dict[str, dict]:
    out = {}
    for row, recs in rows_of(records).items():
        out[row] = {"baseline": recs[0].baseline, "method": recs[0].method, "seeds": [r.seed for r in recs],
                    "metrics": {key: aggregate([record_value(r, key) for r in recs]) for key, _, _ in COLUMNS}}
    return out
