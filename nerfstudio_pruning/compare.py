"""`ns-prune-compare`: how much smaller, faster and worse than splatfacto, in one table and one picture.

For one dataset it trains (or takes existing runs of) splatfacto-portable, pup-gs (post-hoc, from the splatfacto
run's checkpoint, as the paper prunes a trained model) and vedal-gs, all through `ns-train` with the same split
and seeds, then evaluates every run on the same held-out views and reports PSNR, SSIM, LPIPS (when its weights are
available), Gaussian count, exported PLY size, render time per frame and FPS (median over the eval views after a
warm-up, on the device used), training time and scoring time. Writes results.json, results.md and compare.png.

Every pruned run is read against an unpruned run of the same budget and seed:

- "splatfacto (30k)" and "splatfacto (40k)" are one splatfacto-portable run of 40k steps that keeps its 30k
  checkpoint. pup-gs starts from that checkpoint and refines 5k + 5k steps, so it is read against the 40k row; the
  30k row is what it started from.
- "splatfacto (densify to 7k)" is splatfacto-portable for 30k steps with densification, culling and opacity resets
  stopped where vedal-gs stops them (its fine-tuning start, 7k): vedal-gs is read against it.

`--seeds` repeats every run per seed; each cell is then the mean ± half the range over seeds.

`--schedule-scale` multiplies every step count of every method together (densification intervals, pruning
rounds, VEDAL's fine-tuning phase, learning-rate schedules), so the whole comparison fits in minutes on a CPU; it
defaults to 1 (the papers' schedules) on a GPU and 1/30 on a CPU (about 6.5 minutes for the built-in scene on 2
cores with the compiled rasterizer), and is stated in every output.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import torch
import tyro

from nerfstudio_pruning.compare_data import Scene, SceneError, resolve_scene
from nerfstudio_pruning.compare_progress import RunProgress

# flag: (steps in the full schedule, floor when scaled). Densifying every few steps compounds splits before
# the new Gaussians have moved (hundreds of thousands within a hundred steps), so the interval keeps a floor.
SPLATFACTO_STEP_FIELDS = {
    "pipeline.model.warmup-length": (500, 50),
    "pipeline.model.refine-every": (100, 25),
    "pipeline.model.resolution-schedule": (3000, 1),
    "pipeline.model.stop-split-at": (15000, 1),
    "pipeline.model.sh-degree-interval": (1000, 1),
    "pipeline.model.stop-screen-size-at": (4000, 1),
}
FULL_TRAINING_STEPS = 30000
PUP_REFINE_STEPS = (5000, 5000)
# A refresh every few steps would spend the run measuring importance; the gate counts refreshes, not steps.
VEDAL_STEP_FIELDS = {"pipeline.model.finetune-start-step": (7000, 1), "pipeline.model.importance-every": (100, 10)}
METHODS = ("splatfacto-portable", "pup-gs", "vedal-gs")
SCORED_LINE = re.compile(r"scored \d+ Gaussians in ([0-9.]+) s")

ROW_30K = "splatfacto (30k)"
ROW_40K = "splatfacto (40k)"
ROW_DENSIFY = "splatfacto (densify to 7k)"
# --runs keys: the three methods and the densify-to-7k baseline; besides these, the row labels of the variants
# asked for (`variant_labels`).
RUN_KEYS = METHODS + ("splatfacto-densify",)
SPREAD = "half the range over seeds, (max - min) / 2"


class CompareError(Exception):
    """Input ns-prune-compare refuses before it trains or writes anything; printed as one `error:` line."""


@dataclass
class CompareConfig:
    """Train or load splatfacto, pup-gs and vedal-gs on one dataset and compare them at equal budgets."""

    scene: str = "default"
    """'default' for the built-in scene, or a dataset folder (nerfstudio-data, colmap or blender-data)."""
    dataparser: Literal["auto", "nerfstudio-data", "colmap", "blender-data"] = "auto"
    """How to read --scene: auto picks nerfstudio-data for transforms.json, colmap for sparse/0 or colmap/sparse/0, blender-data for transforms_train.json. Datasets without seed points train from random initialisation."""
    downscale_factor: Optional[int] = None
    """Image downscale for a dataset folder (downscaled copies are cached, the data is never written)."""
    output_dir: Path = Path("outputs/compare")
    """Where runs, logs, results.json/.md and compare.png go."""
    schedule_scale: Optional[float] = None
    """Multiply every step count by this (default: 1 on a GPU, 1/30 on a CPU)."""
    methods: Tuple[str, ...] = METHODS
    """Methods to compare. pup-gs brings its baselines splatfacto (30k) and (40k), vedal-gs brings splatfacto (densify to 7k); splatfacto-portable alone gives the 30k and 40k rows."""
    runs: Tuple[str, ...] = ()
    """Existing runs to use instead of training, as KEY=path/to/config.yml, or KEY/sSEED=... with several seeds. KEY: splatfacto-portable (a 40k run that kept its 30k checkpoint, or a 30k run, which is then continued to 40k), pup-gs, vedal-gs, splatfacto-densify, and the variants' row labels (pup-gs-speedy with --pup-scores speedy, vedal-gs-kl2 with --kl-weights 2, vedal-gs-cap0.95 with --eligible-caps 0.95, vedal-gs-no-gate with --gate-ablation)."""
    kl_weights: Tuple[float, ...] = ()
    """Extra vedal-gs runs, one per KL weight, drawn as a rate-distortion curve."""
    eligible_caps: Tuple[float, ...] = ()
    """Extra vedal-gs runs at the default KL weight, one per gate cap (--pipeline.model.gate.max-eligible-fraction, default 0.85). Only gated Gaussians can be removed, so a cap C allows at most 1/(1 - C) x fewer; at the default weight on our scenes the cap, not the weight, sets the size (docs/results.md)."""
    gate_ablation: bool = False
    """Also run vedal-gs with the gate disabled (synchronous variational pruning, the paper's ablation)."""
    pup_scores: Tuple[str, ...] = ("fisher",)
    """pup-gs runs, one per score (fisher, fisher-probe, lightgaussian, opacity, random), same rounds."""
    seeds: Tuple[int, ...] = (42,)
    """Every run is repeated with each seed; the table shows mean ± half the range over seeds."""
    seed: Optional[int] = None
    """One seed (the same as --seeds SEED; kept for older command lines)."""
    train: bool = True
    """--no-train: train nothing; evaluate only the runs given by --runs and leave out the rows that would need training (said in the notes). For runs finished in different sessions: such tables combine later with --merge."""
    merge: Tuple[Path, ...] = ()
    """results.json files of earlier comparisons (e.g. one per seed, made on different machines) to combine into one table, json and plot in --output-dir; nothing is trained or evaluated, and the other options are ignored."""
    eval_warmup: int = 1
    """Renders per eval view discarded before timing."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Device for training and evaluation."""
    experiment_name: str = "compare"

    def scale(self) -> float:
        if self.schedule_scale is not None:
            if not 0 < self.schedule_scale <= 1:
                raise CompareError(f"--schedule-scale must be in (0, 1], got {self.schedule_scale}")
            return self.schedule_scale
        return 1.0 if self.device == "cuda" else 1.0 / 30.0

    def seed_list(self) -> Tuple[int, ...]:
        if self.seed is not None:
            if self.seeds not in ((42,), (self.seed,)):
                raise CompareError("give either --seed or --seeds, not both")
            return (self.seed,)
        if not self.seeds:
            raise CompareError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"--seeds repeats a seed: {' '.join(map(str, self.seeds))}")
        return tuple(self.seeds)


def scaled(steps: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(steps * scale)))


@dataclass
class Schedule:
    """Step counts of one comparison, all scaled together."""

    scale: float
    steps_30k: int
    refine: Tuple[int, ...]
    densify_stop: int

    @classmethod
    def of(cls, scale: float) -> "Schedule":
        floor = VEDAL_STEP_FIELDS["pipeline.model.finetune-start-step"][1]
        return cls(scale, scaled(FULL_TRAINING_STEPS, scale, minimum=10), tuple(scaled(s, scale) for s in PUP_REFINE_STEPS),
                   scaled(7000, scale, minimum=floor))

    @property
    def steps_40k(self) -> int:
        return self.steps_30k + sum(self.refine)

    def vedal_args(self) -> List[str]:
        args = [a for flag, (v, floor) in VEDAL_STEP_FIELDS.items() for a in (f"--{flag}", str(scaled(v, self.scale, minimum=floor)))]
        return args + ["--pipeline.model.hard-prune-step", str(self.steps_30k - 1)]


def common_train_args(cfg: CompareConfig, name: str, max_steps: int, output_dir: Path, seed: int,
                      overrides: Optional[Dict[str, str]] = None, steps_per_save: Optional[int] = None) -> List[str]:
    s = cfg.scale()
    args = [
        "--vis", "tensorboard", "--output-dir", str(output_dir / "runs"), "--experiment-name", cfg.experiment_name,
        "--timestamp", name, "--machine.seed", str(seed), "--machine.device-type", cfg.device,
        # nerfstudio draws the order of the training views from a seed of the datamanager's own (default 42).
        "--pipeline.datamanager.train-cameras-sampling-seed", str(seed),
        "--max-num-iterations", str(max_steps), "--steps-per-save", str(max(steps_per_save or max_steps, 1)),
        "--steps-per-eval-image", "1000000000", "--steps-per-eval-all-images", "1000000000",
        "--optimizers.means.scheduler.max-steps", str(scaled(FULL_TRAINING_STEPS, s)),
    ]
    fields = {flag: str(scaled(steps, s, minimum=floor)) for flag, (steps, floor) in SPLATFACTO_STEP_FIELDS.items()}
    fields.update(overrides or {})
    for flag, value in fields.items():
        args += [f"--{flag}", value]
    return args


@dataclass
class Job:
    """One ns-train run to make."""

    label: str
    method: str
    seed: int
    dirname: str
    max_steps: int
    extra: List[str] = field(default_factory=list)
    overrides: Dict[str, str] = field(default_factory=dict)
    first_step: int = 0
    steps_per_save: Optional[int] = None
    keep_all_checkpoints: bool = False
    seconds: Optional[float] = None
    started_wall: Optional[float] = None
    log: Optional[Path] = None

    def config(self, cfg: CompareConfig, output_dir: Path) -> Path:
        return output_dir / "runs" / cfg.experiment_name / self.method / self.dirname / "config.yml"


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
    gate: Optional[dict] = None
    pruning: Optional[dict] = None
    eval_config: Optional[Path] = None
    metrics: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "job"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


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


def export_size_mb(record: RunRecord, output_dir: Path) -> float:
    """Size of the PLY that `ns-export gaussian-splat` writes for the run: nerfstudio's exporter, called here rather
    than as a command because a new process spends ~10 s importing nerfstudio for a sub-second export."""
    from nerfstudio.scripts.exporter import ExportGaussianSplat
    from nerfstudio.utils.rich_utils import CONSOLE

    out = output_dir / "exports" / record.label.replace("/", "-").replace(" ", "_")
    quiet, CONSOLE.quiet = CONSOLE.quiet, True  # its loading and filtering messages would break up the progress
    try:
        ExportGaussianSplat(load_config=record.eval_config or record.config, output_dir=out).main()
    finally:
        CONSOLE.quiet = quiet
    return (out / "splat.ply").stat().st_size / 1e6


def evaluate(record: RunRecord, cfg: CompareConfig) -> Tuple[Dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics on the eval views, timing of plain renders, and the first eval view's render and ground truth."""
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.methods.base import PortableSplatfactoModel

    _, pipeline, checkpoint, step = eval_setup(record.eval_config or record.config, test_mode="test")
    record.step = int(step)
    model = pipeline.model
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    per_view: List[Dict[str, float]] = []
    times: List[float] = []
    first_image = first_gt = None
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            camera = camera.to(model.device)
            for _ in range(cfg.eval_warmup):
                PortableSplatfactoModel.get_outputs(model, camera)
            sync()
            started = time.perf_counter()
            outputs = PortableSplatfactoModel.get_outputs(model, camera)
            sync()
            times.append(time.perf_counter() - started)
            metrics, _ = model.get_image_metrics_and_images(outputs, batch)
            per_view.append(metrics)
            if first_image is None:
                first_image = outputs["rgb"].clamp(0, 1).cpu()
                gt = model.composite_with_background(model.get_gt_img(batch["image"]), outputs["background"])
                first_gt = gt.clamp(0, 1).cpu()
    keys = sorted(set.intersection(*(set(m) for m in per_view)))
    summary = {k: float(statistics.fmean(m[k] for m in per_view)) for k in keys if k != "num_gaussians"}
    summary["num_gaussians"] = float(model.num_points)
    render = statistics.median(times)
    summary["render_ms"] = 1000.0 * render
    summary["fps"] = 1.0 / render if render > 0 else math.inf
    return summary, first_image, first_gt


# -- table ---------------------------------------------------------------------------------------------------------
# (key, header, format); the value of a key is a metric, or a record attribute, or x_fewer.
COLUMNS = [("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".3f"), ("lpips", "LPIPS", ".3f"),
           ("num_gaussians", "Gaussians", ".0f"), ("x_fewer", "x fewer", ".2f"), ("ply_mb", "PLY MB", ".2f"),
           ("render_ms", "render ms", ".1f"), ("fps", "FPS", ".1f"), ("train_seconds", "train s", ".0f"),
           ("scoring_seconds", "scoring s", ".1f")]


def record_value(record: RunRecord, key: str) -> Optional[float]:
    if key in ("train_seconds", "scoring_seconds"):
        return getattr(record, key)
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


def cell(agg: Optional[dict], fmt: str) -> str:
    if agg is None:
        return "-"
    if agg["n"] == 1:
        return format(agg["mean"], fmt)
    return f"{format(agg['mean'], fmt)} ± {format(agg['spread'], fmt)}"


def markdown_table(records: List[RunRecord], notes: List[str]) -> str:
    has_lpips = all("lpips" in r.metrics for r in records)
    columns = [c for c in COLUMNS if has_lpips or c[0] != "lpips"]
    head = ["run"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, agg in aggregates(records).items():
        lines.append("| " + " | ".join([row] + [cell(agg["metrics"][k], fmt) for k, _, fmt in columns]) + " |")
    notes = list(notes)
    if not has_lpips:
        notes.append("LPIPS omitted: its pretrained weights could not be loaded offline.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def draw(records: List[RunRecord], images: Dict[str, torch.Tensor], path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(images))  # no images (a merge of results.json files): the plot alone
    rows = max(1, math.ceil(len(images) / max(columns, 1)))
    fig = plt.figure(figsize=(5.0 + 2.8 * columns, max(4.2, 2.2 * rows)))
    grid = fig.add_gridspec(rows, 1 + columns, width_ratios=[1.8] + [1] * columns)
    ax = fig.add_subplot(grid[:, 0])
    agg = aggregates(records)

    def point(row: str) -> Tuple[float, float, float, float]:
        n, p = agg[row]["metrics"]["num_gaussians"], agg[row]["metrics"]["psnr"]
        return n["mean"], p["mean"], n["spread"], p["spread"]

    kl = {r.row: r.kl_weight for r in records if r.kl_weight is not None}
    sweep = sorted(kl, key=lambda row: point(row)[0])
    if len(sweep) > 1:
        ax.plot([point(r)[0] for r in sweep], [point(r)[1] for r in sweep], "-o", color="tab:green", alpha=0.6,
                label="vedal-gs KL sweep")
        for row in sweep:
            ax.annotate(f"{kl[row]:g}", point(row)[:2], fontsize=7)
    for row in agg:
        if row not in kl or len(sweep) <= 1:
            x, y, dx, dy = point(row)
            ax.errorbar(x, y, xerr=dx or None, yerr=dy or None, fmt="o", markersize=7, label=row, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("Gaussians (log)")
    ax.set_ylabel("eval PSNR (dB)")
    ax.set_title(f"PSNR vs size (schedule x{scale:.3g})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, (label, image) in enumerate(images.items()):
        sub = fig.add_subplot(grid[i // columns, 1 + i % columns])
        sub.imshow(image.numpy())
        sub.set_title(label, fontsize=9)
        sub.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- plan --------------------------------------------------------------------------------------------------------
def absolute_scene(scene: str) -> str:
    """The scene as results.json records it and --merge compares it: 'default', or an absolute path (a path as typed
    is relative to the folder the comparison ran in, and tables made from other folders must still merge)."""
    return scene if scene == "default" else str(Path(scene).resolve())


def vedal_variants(cfg: CompareConfig) -> List[Tuple[str, List[str], Optional[float]]]:
    """The vedal-gs variant rows this comparison asks for: (row label, ns-train arguments beside vedal-gs's schedule,
    KL weight for the rows drawn as the KL sweep's curve)."""
    variants: List[Tuple[str, List[str], Optional[float]]] = []
    if cfg.gate_ablation:
        variants.append(("vedal-gs-no-gate", ["--pipeline.model.use-gate", "False"], None))
    variants += [(f"vedal-gs-kl{w:g}", ["--pipeline.model.kl-weight", str(w)], w) for w in cfg.kl_weights]
    variants += [(f"vedal-gs-cap{c:g}", ["--pipeline.model.gate.max-eligible-fraction", str(c)], None)
                 for c in cfg.eligible_caps]
    return variants


def variant_labels(cfg: CompareConfig) -> List[str]:
    """Row labels of the variant runs this comparison asks for (the keys --runs accepts for them)."""
    labels = [f"pup-gs-{score}" for score in cfg.pup_scores if score != "fisher"]
    return labels + [label for label, _, _ in vedal_variants(cfg)]


def parse_runs(cfg: CompareConfig, seeds: Tuple[int, ...]) -> Dict[Tuple[str, int], Path]:
    given: Dict[Tuple[str, int], Path] = {}
    for item in cfg.runs:
        key, sep, path = item.partition("=")
        key, _, seed_part = key.partition("/")
        keys = RUN_KEYS + tuple(variant_labels(cfg))
        if not sep or key not in keys or not Path(path).is_file():
            raise CompareError(f"--runs expects KEY=path/to/config.yml (KEY: {', '.join(keys)}) with an existing "
                               f"file, got {item!r}")
        if seed_part:
            if not re.fullmatch(r"s-?\d+", seed_part) or int(seed_part[1:]) not in seeds:
                raise CompareError(f"--runs {item!r}: expected KEY/sSEED with SEED one of --seeds {' '.join(map(str, seeds))}")
            seed = int(seed_part[1:])
        elif len(seeds) == 1:
            seed = seeds[0]
        else:
            raise CompareError(f"--runs {item!r}: with several seeds, name the seed (KEY/sSEED=path)")
        if (key, seed) in given:
            raise CompareError(f"--runs names {key} for seed {seed} twice")
        config = Path(path).resolve()
        if not checkpoint_steps(config):
            raise CompareError(f"--runs {item!r}: no checkpoint in {config.parent / 'nerfstudio_models'}")
        given[(key, seed)] = config
    return given


@dataclass
class Plan:
    jobs: List[Job] = field(default_factory=list)
    records: List[RunRecord] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    step_views: List[Tuple[RunRecord, Path, int]] = field(default_factory=list)
    """Records evaluated at an earlier checkpoint of their run: (record, config to write, step)."""


def make_plan(cfg: CompareConfig, sched: Schedule, seeds: Tuple[int, ...], given: Dict[Tuple[str, int], Path],
              output_dir: Path, random_init: bool) -> Plan:
    plan = Plan()
    unused = dict(given)  # a given run no row takes would otherwise vanish from the table without a word

    def take(key: Tuple[str, int]) -> Optional[Path]:
        return unused.pop(key, None)

    extra_init = ["--pipeline.model.random-init", "True"] if random_init else []
    s30, s40 = sched.steps_30k, sched.steps_40k
    refine_total = sum(sched.refine)
    want_base = "splatfacto-portable" in cfg.methods or "pup-gs" in cfg.methods
    for seed in seeds:
        tag = f"s{seed}"

        def job(label: str, method: str, dirname: str, max_steps: int, **kw) -> Job:
            j = Job(f"{label}/{tag}", method, seed, f"{dirname}-{tag}", max_steps, **kw)
            j.extra = extra_init + j.extra
            plan.jobs.append(j)
            return j

        def record(row: str, method: str, config: Path, job: Optional[Job] = None, **kw) -> RunRecord:
            r = RunRecord(f"{row}/{tag}", row, method, seed, config, job=job.label if job else None, **kw)
            plan.records.append(r)
            return r

        start_30k: Optional[Path] = None  # the checkpoint pup-gs starts from
        if want_base:
            base = take(("splatfacto-portable", seed))
            if base is None:
                j40 = job("splatfacto (40k)", "splatfacto-portable", "splatfacto-40k", s40,
                          steps_per_save=max(s30 - 1, 1), keep_all_checkpoints=True)
                config = j40.config(cfg, output_dir)
                r30 = record(ROW_30K, "splatfacto-portable", config, j40)
                plan.step_views.append((r30, output_dir / "step_configs" / f"splatfacto-30k-{tag}" / "config.yml", s30 - 1))
                record(ROW_40K, "splatfacto-portable", config, j40)
                start_30k = checkpoint_path(config, s30 - 1)
            else:
                steps = checkpoint_steps(base)
                if s30 - 1 in steps and steps[-1] > s30 - 1:
                    # A 40k run that kept its 30k checkpoint.
                    r30 = record(ROW_30K, "splatfacto-portable", base)
                    plan.step_views.append((r30, output_dir / "step_configs" / f"splatfacto-30k-{tag}" / "config.yml", s30 - 1))
                    record(ROW_40K, "splatfacto-portable", base)
                    start_30k = checkpoint_path(base, s30 - 1)
                    if steps[-1] != s40 - 1:
                        plan.notes.append(f"The given splatfacto run {base} ends at step {steps[-1] + 1}, not {s40}.")
                else:
                    # A finished run: it is the 30k row, and continuing it gives the 40k row.
                    last = steps[-1]
                    start_30k = checkpoint_path(base, last)
                    record(ROW_30K, "splatfacto-portable", base)
                    j40 = job("splatfacto (40k)", "splatfacto-portable", "splatfacto-40k-continued", refine_total,
                              extra=["--load-checkpoint", str(start_30k)], first_step=last + 1)
                    record(ROW_40K, "splatfacto-portable", j40.config(cfg, output_dir), j40)
                    if last != s30 - 1:
                        plan.notes.append(f"The given splatfacto run ({base}) ends at step {last + 1}, not at this "
                                          f"schedule's {s30}: its '30k' row has {last + 1} steps, the '40k' row "
                                          f"{last + 1 + refine_total}, and pup-gs starts from its step {last + 1}.")
        if "pup-gs" in cfg.methods:
            for score in cfg.pup_scores:
                label = "pup-gs" if score == "fisher" else f"pup-gs-{score}"
                pup = take((label, seed))
                if pup is not None:
                    record(label, "pup-gs", pup, baseline=ROW_40K)
                    continue
                first = int(start_30k.stem.split("-", 1)[1]) + 1
                j = job(label, "pup-gs", label, refine_total, first_step=first,
                        extra=["--load-checkpoint", str(start_30k), "--pipeline.model.refine-steps", *map(str, sched.refine),
                               "--pipeline.model.score", score])
                record(label, "pup-gs", j.config(cfg, output_dir), j, baseline=ROW_40K)
        if "vedal-gs" in cfg.methods:
            dens = take(("splatfacto-densify", seed))
            if dens is None:
                j = job("splatfacto (densify to 7k)", "splatfacto-portable", "splatfacto-densify-7k", s30,
                        overrides={"pipeline.model.stop-split-at": str(sched.densify_stop)})
                dens = j.config(cfg, output_dir)
                record(ROW_DENSIFY, "splatfacto-portable", dens, j)
            else:
                record(ROW_DENSIFY, "splatfacto-portable", dens)
            vedal_extra = sched.vedal_args()
            vedal = take(("vedal-gs", seed))
            if vedal is not None:
                record("vedal-gs", "vedal-gs", vedal, baseline=ROW_DENSIFY)
            else:
                j = job("vedal-gs", "vedal-gs", "vedal-gs", s30, extra=list(vedal_extra))
                record("vedal-gs", "vedal-gs", j.config(cfg, output_dir), j, baseline=ROW_DENSIFY)
            # A variant not asked for has no label --runs accepts (parse_runs), so no given run is left untaken here.
            for label, args, weight in vedal_variants(cfg):
                given_run = take((label, seed))
                if given_run is not None:
                    record(label, "vedal-gs", given_run, baseline=ROW_DENSIFY, kl_weight=weight)
                    continue
                j = job(label, "vedal-gs", label, s30, extra=vedal_extra + args)
                record(label, "vedal-gs", j.config(cfg, output_dir), j, baseline=ROW_DENSIFY, kl_weight=weight)
    if unused:
        names = ", ".join(f"{key}/s{seed}" for key, seed in unused)
        raise CompareError(f"--runs {names}: no row of this comparison takes it (--methods and --pup-scores decide "
                           f"the rows: pup-gs is the 'fisher' score, splatfacto-densify belongs to vedal-gs)")
    return plan


def given_runs_only(plan: Plan) -> Plan:
    """The plan without its jobs: the rows of the given runs only (--no-train)."""
    kept = [r for r in plan.records if r.job is None]
    if not kept:
        raise CompareError("--no-train needs --runs: nothing to evaluate")
    left_out = list(dict.fromkeys(r.label for r in plan.records if r.job is not None))
    notes = list(plan.notes)
    if left_out:
        notes.append(f"--no-train: left out, since they would have to be trained: {', '.join(left_out)}.")
    return Plan(records=kept, notes=notes, step_views=[v for v in plan.step_views if v[0].job is None])


def train(cfg: CompareConfig, job: Job, scene: Scene, output_dir: Path, progress: RunProgress) -> None:
    job.log = output_dir / "logs" / f"{job.dirname}.log"
    args = common_train_args(cfg, job.dirname, job.max_steps, output_dir, job.seed, job.overrides, job.steps_per_save)
    if job.keep_all_checkpoints:
        args += ["--save-only-latest-checkpoint", "False"]
    command = [str(Path(sys.executable).parent / "ns-train"), job.method, *args, *job.extra, *scene.args]
    # A run of the same name from an earlier comparison in this output folder: its checkpoints would otherwise stay
    # beside this run's (nerfstudio only clears them when it keeps the latest checkpoint alone), and be taken for its.
    for stale in (job.config(cfg, output_dir).parent / "nerfstudio_models").glob("step-*.ckpt"):
        stale.unlink()
    job.started_wall = time.time()
    started = time.perf_counter()
    proc = progress.run(command, job.log, job.label, job.first_step, job.max_steps)
    job.seconds = time.perf_counter() - started
    if proc.returncode != 0:
        text = job.log.read_text(errors="replace")
        raise RuntimeError(f"ns-train {job.method} failed (exit {proc.returncode}); last lines of {job.log}:\n{text[-2500:]}")
    config = job.config(cfg, output_dir)
    if not config.is_file():
        raise RuntimeError(f"ns-train {job.method} finished but wrote no {config}; see {job.log}")


def seeds_note(seeds) -> str:
    return f"Seeds {', '.join(map(str, seeds))}: each cell is the mean ± {SPREAD}; results.json keeps every run."


def table_notes(cfg: CompareConfig, sched: Schedule, scene: Scene, seeds: Tuple[int, ...], records: List[RunRecord],
                plan_notes: List[str], jobs: Dict[str, Job]) -> List[str]:
    rows = {r.row for r in records}
    continued = any(r.row == ROW_40K and r.job and jobs[r.job].first_step > 0 for r in records)
    s = sched.scale
    notes = [f"Schedule scale {s:.4g} (every step count x{s:.4g}): '30k' is {sched.steps_30k} steps, '40k' "
             f"{sched.steps_40k}, '7k' {sched.densify_stop}; device {cfg.device}; render time is the median over the "
             "eval views after warm-up."]
    if len(seeds) > 1:
        notes.append(seeds_note(seeds))
    else:
        notes.append(f"Seed {seeds[0]}.")
    if ROW_30K in rows and continued:
        notes.append(f"{ROW_30K} is the given splatfacto-portable run (pup-gs's starting point); {ROW_40K} is that run "
                     f"continued for {sum(sched.refine)} steps, its train s those steps only.")
    elif ROW_30K in rows:
        notes.append(f"{ROW_30K} and {ROW_40K} are one splatfacto-portable run of {sched.steps_40k} steps, evaluated "
                     f"after its first {sched.steps_30k} steps (the checkpoint pup-gs starts from) and at its end; the "
                     "30k row's train s is the time until that checkpoint was written.")
    if any(r.method == "pup-gs" for r in records):
        notes.append(f"Read pup-gs against {ROW_40K}: both train {sched.steps_40k} steps in all ({sched.steps_30k} "
                     f"splatfacto + {' + '.join(map(str, sched.refine))} refinement); its train s is the pruning and "
                     "refinement only.")
    if ROW_DENSIFY in rows:
        notes.append(f"Read vedal-gs against {ROW_DENSIFY}: both train {sched.steps_30k} steps with densification, "
                     f"culling and opacity resets stopped at step {sched.densify_stop} (vedal-gs's fine-tuning start), "
                     "so the two differ by the pruning alone.")
    if any(row.startswith("vedal-gs-cap") for row in rows):
        notes.append("vedal-gs-capC: vedal-gs at its default KL weight with the gate's cap (max_eligible_fraction) at C "
                     "instead of 0.85; only gated Gaussians can be removed, so it removes at most a fraction C.")
    if "vedal-gs-no-gate" in rows:
        notes.append("vedal-gs-no-gate: the paper's ablation, every Gaussian under the KL prior from the fine-tuning "
                     "start, no gate; its importance passes (scoring s) only set the unit of kl_weight.")
    if any(r.baseline for r in records):
        notes.append("'x fewer' is the Gaussian count of the row a run is read against (same seed) over the run's.")
    sources = {r.scoring_source for r in records if r.method in ("pup-gs", "vedal-gs")}
    if sources:
        methods = {r.method for r in records}
        parts = (["pup-gs's scoring summed over its rounds"] if "pup-gs" in methods else []) + (
            ["vedal-gs's leave-one-out importance passes"] if "vedal-gs" in methods else [])
        text = "Scoring s: " + ", ".join(parts)
        if "pruning.json" in sources:
            text += ", read from each run's pruning.json"
        missing = sorted({r.row for r in records if r.method in ("pup-gs", "vedal-gs") and r.scoring_source != "pruning.json"})
        if missing:
            text += (f"; no pruning.json for {', '.join(missing)} (older runs): taken from the training log where it "
                     "prints it (pup-gs's 'scored ... in ... s' lines), '-' where it does not")
        notes.append(text + ".")
    given = list(dict.fromkeys(r.row for r in records if r.job is None))
    if given:
        notes.append(f"Taken from --runs, not trained here (their schedules are their own): {', '.join(given)}.")
    scene_name = "the built-in scene" if scene.name == "default" else f"{scene.name} ({scene.dataparser})"
    notes.append(f"Scene: {scene_name}" + (", random init (no seed points)" if scene.random_init else "") + ".")
    notes += scene.notes + plan_notes
    return notes


def run(cfg: CompareConfig) -> List[RunRecord]:
    if cfg.merge:
        from nerfstudio_pruning.compare_merge import merge

        return merge(cfg)
    # Everything that can be refused is checked before anything is trained or written.
    for method in cfg.methods:
        if method not in METHODS:
            raise CompareError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not cfg.methods:
        raise CompareError("--methods is empty")
    vedal_variants = [name for name, asked in (("--kl-weights", cfg.kl_weights), ("--eligible-caps", cfg.eligible_caps),
                                               ("--gate-ablation", cfg.gate_ablation)) if asked]
    if vedal_variants and "vedal-gs" not in cfg.methods:
        raise CompareError(f"{', '.join(vedal_variants)}: vedal-gs rows, and --methods leaves vedal-gs out")
    for cap in cfg.eligible_caps:
        if not 0 < cap <= 1:
            raise CompareError(f"--eligible-caps are fractions of the Gaussians in (0, 1], got {cap:g}")
    scale = cfg.scale()
    sched = Schedule.of(scale)
    seeds = cfg.seed_list()
    output_dir = cfg.output_dir.resolve()
    given = parse_runs(cfg, seeds)
    try:
        scene = resolve_scene(cfg.scene, cfg.dataparser, cfg.downscale_factor, default_scene_dir=output_dir / "scene")
    except SceneError as err:
        raise CompareError(str(err)) from None
    plan = make_plan(cfg, sched, seeds, given, output_dir, scene.random_init)
    if not cfg.train:
        plan = given_runs_only(plan)

    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compare] schedule scale {scale:.4g} ({sched.steps_30k}/{sched.steps_40k} steps), device {cfg.device}, "
          f"seeds {' '.join(map(str, seeds))}, {len(plan.jobs)} runs to train, outputs in {output_dir}", flush=True)
    jobs = {j.label: j for j in plan.jobs}
    with RunProgress(len(plan.jobs)) as progress:
        for job in plan.jobs:
            train(cfg, job, scene, output_dir, progress)

    records = plan.records
    for r in records:
        j = jobs.get(r.job) if r.job else None
        if j is not None:
            r.train_seconds = j.seconds
        attach_scoring(r, j.log if j else None)
    for r, out, step in plan.step_views:
        checkpoint = checkpoint_path(r.config, step)
        if not checkpoint.is_file():
            raise RuntimeError(f"{r.config.parent.name} did not keep its step-{step} checkpoint ({checkpoint})")
        r.eval_config = config_at_step(r.config, step, out)
        j = jobs.get(r.job) if r.job else None
        r.train_seconds = checkpoint.stat().st_mtime - j.started_wall if j and j.started_wall else None

    images: Dict[str, torch.Tensor] = {}
    for r in records:
        print(f"[compare] evaluating {r.label}", flush=True)
        r.metrics, image, gt = evaluate(r, cfg)
        r.metrics["ply_mb"] = export_size_mb(r, output_dir)
        images.setdefault("ground truth", gt)
        if r.kl_weight is None:
            images.setdefault(r.row, image)
    add_x_fewer(records)
    notes = table_notes(cfg, sched, scene, seeds, records, plan.notes, jobs)
    payload = {
        "scene": absolute_scene(cfg.scene),
        "downscale_factor": cfg.downscale_factor,
        "dataparser": scene.dataparser, "random_init": scene.random_init, "schedule_scale": scale,
        "schedule": {"steps_30k": sched.steps_30k, "steps_40k": sched.steps_40k, "pup_refine": list(sched.refine),
                     "densify_stop": sched.densify_stop},
        "device": cfg.device, "seeds": list(seeds), "seed": seeds[0], "spread": SPREAD,
    }
    write_outputs(output_dir, cfg.scene, records, notes, payload, images, scale)
    return records


def write_outputs(output_dir: Path, scene: str, records: List[RunRecord], notes: List[str], payload: dict,
                  images: Dict[str, torch.Tensor], scale: float) -> None:
    """results.md, results.json (payload plus the runs and rows) and compare.png, as every comparison writes them."""
    table = markdown_table(records, notes)
    (output_dir / "results.md").write_text(f"# Pruning comparison on {scene}\n\n{table}")
    payload = {**payload, "runs": [r.to_json() for r in records], "rows": aggregates(records), "notes": notes}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2))
    draw(records, images, output_dir / "compare.png", scale)
    print("\n" + table)
    print(f"[compare] table: {output_dir / 'results.md'}\n[compare] json:  {output_dir / 'results.json'}\n"
          f"[compare] plot:  {output_dir / 'compare.png'}")


def entrypoint() -> None:
    tyro.extras.set_accent_color("bright_yellow")
    cfg = tyro.cli(CompareConfig)
    try:
        run(cfg)
    except CompareError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    entrypoint()
