"""Training and evaluating the runs of a plan: each `ns-train` run as a subprocess, evaluation and export in-process.

Training runs in subprocesses because that is what a user runs (`ns-train`, its config.yml and checkpoints, the
same plugin entry points); on a CPU with several cores, several at once (`--parallel-runs`). Evaluation loads each
run with nerfstudio's `eval_setup`, as `ns-eval` does, and the PLY size comes from nerfstudio's exporter, called here
rather than as a command because a new process spends ~10 s importing nerfstudio for a sub-second export.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from nerfstudio_pruning.compare.config import CompareConfig
from nerfstudio_pruning.compare.data import Scene
from nerfstudio_pruning.compare.plan import Job
from nerfstudio_pruning.compare.progress import RunProgress
from nerfstudio_pruning.compare.records import RunRecord
from nerfstudio_pruning.compare.schedule import common_train_args


def train_command(cfg: CompareConfig, job: Job, scene: Scene, output_dir: Path) -> List[str]:
    """The ns-train command of one job (and its log's path set on the job)."""
    job.log = output_dir / "logs" / f"{job.dirname}.log"
    args = common_train_args(cfg, job.dirname, job.max_steps, output_dir, job.seed, job.overrides, job.steps_per_save)
    if job.keep_all_checkpoints:
        args += ["--save-only-latest-checkpoint", "False"]
    # A run of the same name from an earlier comparison in this output folder: its checkpoints would otherwise stay
    # beside this run's (nerfstudio only clears them when it keeps the latest checkpoint alone), and be taken for its.
    for stale in (job.config(cfg, output_dir).parent / "nerfstudio_models").glob("step-*.ckpt"):
        stale.unlink()
    return [str(Path(sys.executable).parent / "ns-train"), job.method, *args, *job.extra, *scene.args]


def thread_env(parallel: int) -> Optional[Dict[str, str]]:
    """The environment of runs trained `parallel` at a time on a CPU: the cores shared out between them (numba's and
    torch's pools each take every core by default, and two such pools on the same cores slow each other several-fold).
    Thread counts the user set are kept."""
    if parallel <= 1:
        return None
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    env = dict(os.environ)
    for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    return env


# A vedal-gs step costs about this many splatfacto steps (its importance passes and retention head): the demo's
# 1,000-step vedal-gs run took 222 s against 96 s for splatfacto's (2-core Intel VM, two runs at once, 740b135).
STEP_COST = {"vedal-gs": 2.3}


def chain_cost(job: Job, jobs: List[Job]) -> float:
    """The job's estimated cost in splatfacto steps, with the jobs that wait for it (pup-gs after its splatfacto run)."""
    return job.max_steps * STEP_COST.get(job.method, 1.0) + sum(chain_cost(j, jobs) for j in jobs if j.after == job.label)


def train_all(cfg: CompareConfig, jobs: List[Job], scene: Scene, output_dir: Path, progress: RunProgress,
              parallel: int = 1) -> None:
    """Train the jobs, up to `parallel` at once; a job waits for the one it starts from. One at a time they run in
    plan order; several at once, the longest first (with what waits for it), so that the cores finish together."""
    env = thread_env(parallel) if cfg.device == "cpu" else None
    waiting, running, finished = list(jobs), [], set()
    if parallel > 1:
        waiting.sort(key=lambda j: -chain_cost(j, jobs))  # stable: plan order among equals
    try:
        while waiting or running:
            for job in list(waiting):
                if len(running) >= parallel:
                    break
                if job.after is None or job.after in finished:
                    waiting.remove(job)
                    command = train_command(cfg, job, scene, output_dir)
                    job.started_wall = time.time()
                    running.append((job, progress.start(command, job.log, job.label, job.first_step, job.max_steps, env)))
            if not running:
                raise RuntimeError(f"no job can start: {', '.join(j.label for j in waiting)} wait for runs not in the plan")
            time.sleep(progress.poll_seconds)
            for job, handle in list(running):
                code = progress.poll(handle)
                if code is None:
                    continue
                running.remove((job, handle))
                job.seconds = handle.seconds
                check_finished(cfg, job, code, output_dir)
                finished.add(job.label)
    except BaseException:
        for _, handle in running:
            progress.stop(handle)
        raise


def check_finished(cfg: CompareConfig, job: Job, code: int, output_dir: Path) -> None:
    if code != 0:
        text = job.log.read_text(errors="replace")
        raise RuntimeError(f"ns-train {job.method} failed (exit {code}); last lines of {job.log}:\n{text[-2500:]}")
    config = job.config(cfg, output_dir)
    if not config.is_file():
        raise RuntimeError(f"ns-train {job.method} finished but wrote no {config}; see {job.log}")


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """nerfstudio's console silenced: its loading and filtering messages would break up the progress and the table
    (which says itself whether LPIPS was omitted: `lpips_note`)."""
    from nerfstudio.utils.rich_utils import CONSOLE

    quiet, CONSOLE.quiet = CONSOLE.quiet, True
    try:
        yield
    finally:
        CONSOLE.quiet = quiet


def export_size_mb(record: RunRecord, output_dir: Path) -> float:
    """Size of the PLY that `ns-export gaussian-splat` writes for the run."""
    from nerfstudio.scripts.exporter import ExportGaussianSplat

    out = output_dir / "exports" / record.label.replace("/", "-").replace(" ", "_")
    with quiet_console():
        ExportGaussianSplat(load_config=record.eval_config or record.config, output_dir=out).main()
    return (out / "splat.ply").stat().st_size / 1e6


def evaluate(record: RunRecord, cfg: CompareConfig) -> Tuple[Dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics on the eval views, timing of plain renders, and the first eval view's render and ground truth."""
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.methods.base import PortableSplatfactoModel

    with quiet_console():
        _, pipeline, checkpoint, step = eval_setup(record.eval_config or record.config, test_mode="test")
    record.step = int(step)
    model = pipeline.model
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    per_view: List[Dict[str, float]] = []
    times: List[float] = []
    first_image = first_gt = None
    with torch.no_grad(), quiet_console():
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


def lpips_note(records: List[RunRecord]) -> Optional[str]:
    """The table's line saying LPIPS was omitted and why, or None when every run has it."""
    if all("lpips" in r.metrics for r in records):
        return None
    from nerfstudio_pruning.methods.base import lpips_unavailable_reason

    return f"LPIPS omitted: {lpips_unavailable_reason() or 'it could not be built (see an ns-eval of a run)'}."
