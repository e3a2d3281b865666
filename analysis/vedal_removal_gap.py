"""Where vedal-gs's hard removal loses quality: one checkpoint from before the removal, rendered four ways.

During fine-tuning a gated Gaussian renders with opacity o z, z ~ BinaryConcrete(logit p, tau) (nearly a Bernoulli
draw once tau has annealed), so a Gaussian with p = 0.3 is present in about 30% of the steps; the removal keeps
the gated Gaussians with p >= 0.5 for good. This script measures, on the eval views of a vedal-gs checkpoint taken
before the removal (a run with `--save-only-latest-checkpoint False`, or a kept copy):
- `all kept`: every Gaussian at its own opacity (z = 1 for all);
- `inference mask`: gated Gaussians with p < 0.5 hidden, what the removal keeps (and what ns-eval shows before it);
- `expected mask`: gated Gaussians at opacity o p, the mean of what training rendered;
- `sampled masks`: the mean PSNR over a few Bernoulli draws z ~ Bern(p) of the gated Gaussians (the training
  renders at tau -> 0);
and the distribution of p over the gated Gaussians. If the sampled-mask PSNR is close to the training loss's
quality and the inference mask is far below it, the model was trained for a mixture that the removal does not
reproduce (docs/results.md reads the seed-42 run).

The last line is the removal gap: the inference mask's PSNR minus that of what the training steps at this point
render, i.e. the sampled masks, or, in the second half of the last `hard_mask_fraction` of the fine-tuning (where
training renders the removal's own mask, fixed), the inference mask itself, so that the gap there is 0 by
construction and what matters is the PSNR of that row against the sampled-mask rows of a run without it. (In the
first half training renders a blend of the two; the line then compares with the sampled masks.)

With `--after-removal` it also reads a checkpoint from after the removal: the survivors that were gated keep their
frozen p (all >= 0.5), so `inference mask` equals `all kept` there, and the other two rows say whether the
training after an early removal still fits a mixture rather than the model that is shown.

    python analysis/vedal_removal_gap.py path/to/vedal-gs/config.yml [--step 29000] [--samples 4] [--after-removal]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch


def eval_psnr(pipeline, opacity_logits: Optional[torch.Tensor]) -> float:
    """Mean PSNR over the eval views, rendered with the given raw opacity logits [N] (None: as the model renders in
    eval mode, i.e. with the inference mask)."""
    from nerfstudio_pruning.methods.base import PortableSplatfactoModel

    model = pipeline.model
    psnrs: List[float] = []
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            camera = camera.to(model.device)
            if opacity_logits is None:
                outputs = PortableSplatfactoModel.get_outputs(model, camera)
            else:
                with model.rendering_with(opacities=opacity_logits[:, None]):
                    outputs = PortableSplatfactoModel.get_outputs(model, camera)
            metrics, _ = model.get_image_metrics_and_images(outputs, batch)
            psnrs.append(float(metrics["psnr"]))
    return statistics.fmean(psnrs)


def after_removal_refusal(step: int) -> str:
    return (f"step {step}: the removal has happened already; give a checkpoint from before it, or pass "
            "--after-removal to measure its gated survivors")


def refuse_after_removal(args: argparse.Namespace) -> None:
    """Refuse a post-removal checkpoint from its saved flag, before the seconds eval_setup takes."""
    from nerfstudio_pruning.compare.records import checkpoint_path, last_checkpoint

    if args.checkpoint is not None:
        path = args.checkpoint
    elif args.step is not None:
        path = checkpoint_path(args.config, args.step)
    else:
        try:
            path = last_checkpoint(args.config)
        except FileNotFoundError:
            return  # eval_setup says what is missing
    if not path.is_file():
        return  # eval_setup says what is missing
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:
        return  # not a zip-format checkpoint (mmap needs one): the check after eval_setup decides
    vedal = (saved.get("pipeline") or {}).get("_model._extra_state", {}).get("vedal") or {}
    if bool(vedal.get("pruned", False)):
        raise SystemExit(after_removal_refusal(int(saved.get("step", -1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a vedal-gs run's config.yml")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint file of that run kept elsewhere (overrides --step)")
    parser.add_argument("--samples", type=int, default=4, help="Bernoulli mask draws to average")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--after-removal", action="store_true",
                        help="also accept a checkpoint from after the hard removal (its gated survivors)")
    args = parser.parse_args()

    import yaml
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.compare import config_at_step

    config_path = args.config
    if not args.after_removal:
        refuse_after_removal(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is not None:
            # eval_setup loads <the run's own checkpoint folder>/step-XXXXXXXXX.ckpt, whatever load_dir says: a copy
            # of the config with its output folder moved here, where that folder holds only a link to this file.
            step = int(args.checkpoint.stem.split("-")[-1]) if args.checkpoint.stem.startswith("step-") else args.step
            if step is None:
                raise SystemExit("--checkpoint needs a step-XXXXXXXXX.ckpt name or --step")
            loaded = yaml.load(config_path.read_text(), Loader=yaml.Loader)
            loaded.output_dir = Path(tmp) / "outputs"
            folder = loaded.get_checkpoint_dir()
            folder.mkdir(parents=True)
            (folder / f"step-{step:09d}.ckpt").symlink_to(args.checkpoint.resolve())
            loaded.load_step = step
            config_path = Path(tmp) / "config.yml"
            config_path.write_text(yaml.dump(loaded))
        elif args.step is not None:
            config_path = config_at_step(args.config, args.step, Path(tmp) / "config.yml")
        _, pipeline, checkpoint, step = eval_setup(config_path, test_mode="test")
        model = pipeline.model
        raw = model.gauss_params["opacities"].detach().squeeze(-1)
        gated = model.gated_mask()
        if bool(model.vedal.pruned) and not args.after_removal:
            raise SystemExit(after_removal_refusal(step))  # eval_setup's file, where the run is not beside its config
        p = torch.sigmoid(model.retention_logits())
        n, n_gated = int(raw.shape[0]), int(gated.sum())
        when = "after the removal" if bool(model.vedal.pruned) else "before the removal"
        print(f"{checkpoint} (step {step}, {when}): {n:,} Gaussians, {n_gated:,} gated ({n_gated / max(n, 1):.1%})")
        if n_gated == 0:
            raise SystemExit("no gated Gaussians: nothing to compare")
        pg = p[gated]
        deciles = torch.quantile(pg.double(), torch.linspace(0, 1, 11, dtype=torch.float64)).tolist()
        print(f"p over gated: mean {pg.mean():.3f}; p < 0.5: {(pg < 0.5).float().mean():.1%}; "
              f"0.1 < p < 0.9: {((pg > 0.1) & (pg < 0.9)).float().mean():.1%}; "
              f"deciles {' '.join(f'{q:.2f}' for q in deciles)}")

        def with_gated(values: torch.Tensor) -> torch.Tensor:
            """Raw opacity logits with the gated Gaussians' opacities multiplied by `values` (in [0, 1])."""
            scaled = torch.sigmoid(raw[gated]) * values
            out = raw.clone()
            out[gated] = torch.logit(scaled.clamp(1e-12, 1 - 1e-7))
            return out

        rows: Dict[str, str] = {}
        rows["all kept"] = f"{eval_psnr(pipeline, raw):.2f}"
        rows["inference mask (what the removal keeps)"] = f"{eval_psnr(pipeline, None):.2f}"
        rows["expected mask (opacity x p)"] = f"{eval_psnr(pipeline, with_gated(pg)):.2f}"
        generator = torch.Generator().manual_seed(args.seed)
        sampled = []
        for _ in range(args.samples):
            z = (torch.rand(pg.shape, generator=generator).to(pg.device) < pg).to(pg.dtype)
            sampled.append(eval_psnr(pipeline, with_gated(z)))
        spread = f" (min {min(sampled):.2f}, max {max(sampled):.2f})" if len(sampled) > 1 else ""
        rows[f"sampled masks z ~ Bern(p), mean of {len(sampled)}"] = f"{statistics.fmean(sampled):.2f}{spread}"
        inference = float(rows["inference mask (what the removal keeps)"])
        hard_phase = not bool(model.vedal.pruned) and model.vedal.hardening(step + 1) >= 1.0
        trained = inference if hard_phase else statistics.fmean(sampled)
    print("\n| render of the eval views | PSNR |\n|---|---|")
    for label, value in rows.items():
        print(f"| {label} | {value} |")
    if bool(model.vedal.pruned):
        return  # after the removal no step renders masks: there is no gap to state
    what = "the removal's mask, fixed (hard_mask_fraction)" if hard_phase else "sampled masks"
    print(f"\nremoval gap: {inference - trained:+.2f} dB (inference mask against what training renders at step "
          f"{step + 1}: {what})")


if __name__ == "__main__":
    main()
