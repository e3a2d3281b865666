"""`ns-prune-compare`: how much smaller, faster and worse than splatfacto, in one table and one picture.

For one dataset it trains (or takes existing runs of) splatfacto-portable, pup-gs (post-hoc, from the splatfacto
run's checkpoint, as the paper prunes a trained model) and vedal-gs, all through `ns-train` with the same split
and seed, then evaluates every run on the same held-out views and reports PSNR, SSIM, LPIPS (when its weights are
available), Gaussian count, exported PLY size, render time per frame and FPS (median over the eval views after a
warm-up, on the device used), training time and scoring time. Writes results.json, results.md and compare.png.

`--schedule-scale` multiplies every step count of every method together (densification intervals, pruning
rounds, VEDAL's fine-tuning phase, learning-rate schedules), so the whole comparison fits in minutes on a CPU; it
defaults to 1 (the papers' schedules) on a GPU and 1/60 on a CPU, and is stated in every output.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import tyro

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


@dataclass
class CompareConfig:
    """Train or load splatfacto, pup-gs and vedal-gs on one dataset and compare them."""

    scene: str = "default"
    """'default' for the built-in scene, or a nerfstudio-format dataset folder."""
    downscale_factor: Optional[int] = None
    """Image downscale for a dataset folder (downscaled copies are cached, the data is never written)."""
    output_dir: Path = Path("outputs/compare")
    """Where runs, logs, results.json/.md and compare.png go."""
    schedule_scale: Optional[float] = None
    """Multiply every step count by this (default: 1 on a GPU, 1/60 on a CPU)."""
    methods: Tuple[str, ...] = METHODS
    """Methods to compare (splatfacto-portable is the reference and pup-gs's starting point)."""
    runs: Tuple[str, ...] = ()
    """Existing runs to use instead of training, as METHOD=path/to/config.yml."""
    kl_weights: Tuple[float, ...] = ()
    """Extra vedal-gs runs, one per KL weight, drawn as a rate-distortion curve."""
    gate_ablation: bool = False
    """Also run vedal-gs with the gate disabled (synchronous variational pruning, the paper's ablation)."""
    pup_scores: Tuple[str, ...] = ("fisher",)
    """pup-gs runs, one per score (fisher, fisher-probe, lightgaussian, opacity, random), same rounds."""
    seed: int = 42
    """Same seed for every run."""
    eval_warmup: int = 1
    """Renders per eval view discarded before timing."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Device for training and evaluation."""
    experiment_name: str = "compare"

    def scale(self) -> float:
        if self.schedule_scale is not None:
            if not 0 < self.schedule_scale <= 1:
                raise ValueError(f"--schedule-scale must be in (0, 1], got {self.schedule_scale}")
            return self.schedule_scale
        return 1.0 if self.device == "cuda" else 1.0 / 60.0


def scaled(steps: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(steps * scale)))


def dataparser_args(cfg: CompareConfig, output_dir: Path) -> List[str]:
    if cfg.scene == "default":
        return ["nsp-default-scene", "--data", str(output_dir / "scene")]
    data = Path(cfg.scene)
    if not (data / "transforms.json").is_file():
        raise FileNotFoundError(f"{data} is not a nerfstudio-format dataset (no transforms.json)")
    args = ["nerfstudio-data-cached", "--data", str(data.resolve())]
    if cfg.downscale_factor:
        args += ["--downscale-factor", str(cfg.downscale_factor)]
    return args


def common_train_args(cfg: CompareConfig, name: str, max_steps: int, output_dir: Path) -> List[str]:
    s = cfg.scale()
    args = [
        "--vis", "tensorboard", "--output-dir", str(output_dir / "runs"), "--experiment-name", cfg.experiment_name,
        "--timestamp", name, "--machine.seed", str(cfg.seed), "--machine.device-type", cfg.device,
        "--max-num-iterations", str(max_steps), "--steps-per-save", str(max(max_steps, 1)),
        "--steps-per-eval-image", "1000000000", "--steps-per-eval-all-images", "1000000000",
        "--optimizers.means.scheduler.max-steps", str(scaled(FULL_TRAINING_STEPS, s)),
    ]
    for flag, (steps, floor) in SPLATFACTO_STEP_FIELDS.items():
        args += [f"--{flag}", str(scaled(steps, s, minimum=floor))]
    return args


@dataclass
class RunRecord:
    label: str
    method: str
    config: Path
    train_seconds: Optional[float] = None
    scoring_seconds: Optional[float] = None
    kl_weight: Optional[float] = None
    metrics: Dict[str, float] = field(default_factory=dict)


def train(cfg: CompareConfig, label: str, method: str, extra: List[str], max_steps: int, output_dir: Path) -> RunRecord:
    log = output_dir / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "ns-train"), method,
               *common_train_args(cfg, label, max_steps, output_dir), *extra, *dataparser_args(cfg, output_dir)]
    print(f"[compare] training {label} ({max_steps} steps); log: {log}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd=Path.cwd())
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"ns-train {method} failed (exit {proc.returncode}); last lines of {log}:\n{text[-2500:]}")
    config = output_dir / "runs" / cfg.experiment_name / method / label / "config.yml"
    if not config.is_file():
        raise RuntimeError(f"ns-train {method} finished but wrote no {config}; see {log}")
    scoring = [float(x) for x in SCORED_LINE.findall(text)]
    return RunRecord(label, method, config, train_seconds=seconds, scoring_seconds=sum(scoring) if scoring else None)


def last_checkpoint(config: Path) -> Path:
    ckpts = sorted((config.parent / "nerfstudio_models").glob("step-*.ckpt"))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint next to {config}")
    return ckpts[-1]


def export_size_mb(record: RunRecord, output_dir: Path) -> float:
    out = output_dir / "exports" / record.label
    subprocess.run([str(Path(sys.executable).parent / "ns-export"), "gaussian-splat", "--load-config", str(record.config),
                    "--output-dir", str(out)], check=True, capture_output=True)
    return (out / "splat.ply").stat().st_size / 1e6


def evaluate(record: RunRecord, cfg: CompareConfig) -> Tuple[Dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics on the eval views, timing of plain renders, and the first eval view's render and ground truth."""
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.methods.base import PortableSplatfactoModel

    _, pipeline, _, _ = eval_setup(record.config, test_mode="test")
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


def markdown_table(records: List[RunRecord], reference: Optional[RunRecord], scale: float, device: str) -> str:
    has_lpips = all("lpips" in r.metrics for r in records)
    head = ["run", "PSNR", "SSIM"] + (["LPIPS"] if has_lpips else []) + [
        "Gaussians", "x fewer", "PLY MB", "render ms", "FPS", "train s", "scoring s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r.metrics
        fewer = reference.metrics["num_gaussians"] / m["num_gaussians"] if reference else float("nan")
        row = [r.label, f"{m['psnr']:.2f}", f"{m['ssim']:.3f}"] + ([f"{m['lpips']:.3f}"] if has_lpips else []) + [
            f"{int(m['num_gaussians'])}", f"{fewer:.2f}", f"{m['ply_mb']:.2f}", f"{m['render_ms']:.1f}",
            f"{m['fps']:.1f}", "-" if r.train_seconds is None else f"{r.train_seconds:.0f}",
            "-" if r.scoring_seconds is None else f"{r.scoring_seconds:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"Schedule scale {scale:.4g} (every step count x{scale:.4g}); device {device}; render time is the median "
             "over the eval views after warm-up."]
    if not has_lpips:
        notes.append("LPIPS omitted: its pretrained weights could not be loaded offline.")
    notes.append("pup-gs starts from the splatfacto run's checkpoint; its train time is the pruning and refinement only.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def draw(records: List[RunRecord], images: Dict[str, torch.Tensor], path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, max(1, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig = plt.figure(figsize=(5.0 + 2.8 * columns, max(4.2, 2.2 * rows)))
    grid = fig.add_gridspec(rows, 1 + columns, width_ratios=[1.8] + [1] * columns)
    ax = fig.add_subplot(grid[:, 0])
    sweep = sorted((r for r in records if r.kl_weight is not None), key=lambda r: r.metrics["num_gaussians"])
    if len(sweep) > 1:
        ax.plot([r.metrics["num_gaussians"] for r in sweep], [r.metrics["psnr"] for r in sweep], "-o", color="tab:green",
                alpha=0.6, label="vedal-gs KL sweep")
        for r in sweep:
            ax.annotate(f"{r.kl_weight:g}", (r.metrics["num_gaussians"], r.metrics["psnr"]), fontsize=7)
    for r in records:
        if r.kl_weight is None or len(sweep) <= 1:
            ax.scatter(r.metrics["num_gaussians"], r.metrics["psnr"], s=50, label=r.label, zorder=3)
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


def run(cfg: CompareConfig) -> List[RunRecord]:
    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    scale = cfg.scale()
    output_dir = cfg.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    given = {}
    for item in cfg.runs:
        method, _, path = item.partition("=")
        if method not in METHODS or not Path(path).is_file():
            raise ValueError(f"--runs expects METHOD=path/to/config.yml with an existing file, got {item!r}")
        given[method] = RunRecord(method, method, Path(path).resolve())
    print(f"[compare] schedule scale {scale:.4g}, device {cfg.device}, outputs in {output_dir}", flush=True)

    records: List[RunRecord] = []
    steps = scaled(FULL_TRAINING_STEPS, scale, minimum=10)
    base = given.get("splatfacto-portable")
    if base is None and ("splatfacto-portable" in cfg.methods or "pup-gs" in cfg.methods):
        base = train(cfg, "splatfacto-portable", "splatfacto-portable", [], steps, output_dir)
    if base is not None and "splatfacto-portable" in cfg.methods:
        records.append(base)
    if "pup-gs" in cfg.methods:
        refine = [scaled(s, scale) for s in PUP_REFINE_STEPS]
        for score in cfg.pup_scores:
            label = "pup-gs" if score == "fisher" else f"pup-gs-{score}"
            pup = given.get("pup-gs") if score == "fisher" else None
            if pup is None:
                pup = train(cfg, label, "pup-gs", ["--load-checkpoint", str(last_checkpoint(base.config)),
                                                   "--pipeline.model.refine-steps", *map(str, refine),
                                                   "--pipeline.model.score", score], sum(refine), output_dir)
            pup.label = label
            records.append(pup)
    if "vedal-gs" in cfg.methods:
        vedal_extra = [a for flag, (v, floor) in VEDAL_STEP_FIELDS.items()
                       for a in (f"--{flag}", str(scaled(v, scale, minimum=floor)))]
        vedal_extra += ["--pipeline.model.hard-prune-step", str(steps - 1)]
        vedal = given.get("vedal-gs") or train(cfg, "vedal-gs", "vedal-gs", vedal_extra, steps, output_dir)
        records.append(vedal)
        if cfg.gate_ablation:
            ablation = train(cfg, "vedal-gs-no-gate", "vedal-gs", vedal_extra + ["--pipeline.model.use-gate", "False"],
                             steps, output_dir)
            records.append(ablation)
        for w in cfg.kl_weights:
            label = f"vedal-gs-kl{w:g}"
            rec = train(cfg, label, "vedal-gs", vedal_extra + ["--pipeline.model.kl-weight", str(w)], steps, output_dir)
            rec.kl_weight = w
            records.append(rec)

    images: Dict[str, torch.Tensor] = {}
    for r in records:
        print(f"[compare] evaluating {r.label}", flush=True)
        r.metrics, image, gt = evaluate(r, cfg)
        r.metrics["ply_mb"] = export_size_mb(r, output_dir)
        images.setdefault("ground truth", gt)
        if r.kl_weight is None:
            images[r.label] = image
    reference = next((r for r in records if r.method == "splatfacto-portable"), None)
    table = markdown_table(records, reference, scale, cfg.device)
    (output_dir / "results.md").write_text(f"# Pruning comparison on {cfg.scene}\n\n{table}")
    payload = {"scene": cfg.scene, "schedule_scale": scale, "device": cfg.device, "seed": cfg.seed,
               "runs": [{**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(r).items()}} for r in records]}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2))
    draw(records, images, output_dir / "compare.png", scale)
    print("\n" + table)
    print(f"[compare] table: {output_dir / 'results.md'}\n[compare] json:  {output_dir / 'results.json'}\n"
          f"[compare] plot:  {output_dir / 'compare.png'}")
    return records


def entrypoint() -> None:
    tyro.extras.set_accent_color("bright_yellow")
    run(tyro.cli(CompareConfig))


if __name__ == "__main__":
    entrypoint()
