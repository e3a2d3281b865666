"""`ns-prune-compare`'s command: check the input, plan, train, evaluate, report (or merge earlier reports)."""

from __future__ import annotations

import sys
from typing import Dict, List

import torch
import tyro

from nerfstudio_pruning.compare.config import METHODS, CompareConfig, CompareError
from nerfstudio_pruning.compare.data import SceneError, resolve_scene
from nerfstudio_pruning.compare.merge import merge
from nerfstudio_pruning.compare.plan import given_runs_only, make_plan, parse_runs
from nerfstudio_pruning.compare.progress import RunProgress
from nerfstudio_pruning.compare.records import (SPREAD, RunRecord, absolute_scene, add_x_fewer, attach_scoring,
                                                checkpoint_path, config_at_step)
from nerfstudio_pruning.compare.report import table_notes, write_outputs
from nerfstudio_pruning.compare.runner import evaluate, export_size_mb, lpips_note, train_all
from nerfstudio_pruning.compare.schedule import Schedule


def check(cfg: CompareConfig) -> None:
    """Everything about the options that can be refused, before anything is trained or written."""
    for method in cfg.methods:
        if method not in METHODS:
            raise CompareError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not cfg.methods:
        raise CompareError("--methods is empty")
    vedal_variants = [name for name, asked in (("--kl-weights", cfg.kl_weights), ("--eligible-caps", cfg.eligible_caps),
                                               ("--gate-ablation", cfg.gate_ablation)) if asked]
    if vedal_variants and "vedal-gs" not in cfg.methods:
        raise CompareError(f"{', '.join(vedal_variants)}: vedal-gs rows, and --methods leaves vedal-gs out")
    if cfg.target_fractions and not {"pup-gs", "vedal-gs"} & set(cfg.methods):
        raise CompareError("--target-fractions: pup-gs and vedal-gs rows, and --methods leaves both out")
    for fraction in cfg.target_fractions:
        if not 0 < fraction < 1:
            raise CompareError(f"--target-fractions are fractions of the Gaussians to keep, in (0, 1), got {fraction:g}")
    # Not refused without pup-gs in --methods: the demo passes it on a CPU whatever methods its user picks.
    if cfg.pup_target_fraction is not None and not 0 < cfg.pup_target_fraction < 1:
        raise CompareError("--pup-target-fraction is the fraction of the Gaussians pup-gs keeps, in (0, 1), "
                           f"got {cfg.pup_target_fraction:g}")
    for cap in cfg.eligible_caps:
        if not 0 < cap <= 1:
            raise CompareError(f"--eligible-caps are fractions of the Gaussians in (0, 1], got {cap:g}")


def run(cfg: CompareConfig) -> List[RunRecord]:
    if cfg.merge:
        return merge(cfg)
    check(cfg)
    scale, refine_scale, parallel = cfg.scale(), cfg.refinement_scale(), cfg.parallel()
    seeds = cfg.seed_list()
    output_dir = cfg.output_dir.resolve()
    given = parse_runs(cfg, seeds)
    try:
        scene = resolve_scene(cfg.scene, cfg.dataparser, cfg.downscale_factor, default_scene_dir=output_dir / "scene")
    except SceneError as err:
        raise CompareError(str(err)) from None
    sched = Schedule.of(scale, refine_scale)
    plan = make_plan(cfg, sched, seeds, given, output_dir, scene.random_init)
    if not cfg.train:
        plan = given_runs_only(plan)

    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compare] schedule scale {scale:.4g} ({sched.steps_30k}/{sched.steps_40k} steps), device {cfg.device}, "
          f"seeds {' '.join(map(str, seeds))}, {len(plan.jobs)} runs to train"
          f"{f' ({parallel} at a time)' if parallel > 1 and len(plan.jobs) > 1 else ''}, outputs in {output_dir}", flush=True)
    jobs = {j.label: j for j in plan.jobs}
    with RunProgress(len(plan.jobs)) as progress:
        train_all(cfg, plan.jobs, scene, output_dir, progress, parallel)

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
        if r.kl_weight is None and r.target_fraction is None:
            images.setdefault(r.row, image)
    add_x_fewer(records)
    notes = table_notes(cfg, sched, scene, seeds, records, plan.notes, jobs)
    lpips = lpips_note(records)
    if lpips:
        notes.append(lpips)
    payload = {
        "scene": absolute_scene(cfg.scene),
        "downscale_factor": cfg.downscale_factor,
        "dataparser": scene.dataparser, "random_init": scene.random_init, "schedule_scale": scale,
        "refine_scale": sched.refine_scale,
        "schedule": {"steps_30k": sched.steps_30k, "steps_40k": sched.steps_40k, "pup_refine": list(sched.refine),
                     "densify_stop": sched.densify_stop},
        "device": cfg.device, "seeds": list(seeds), "seed": seeds[0], "spread": SPREAD,
    }
    write_outputs(output_dir, cfg.scene, records, notes, payload, images, scale)
    return records


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
