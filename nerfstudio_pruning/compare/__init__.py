"""`ns-prune-compare`: how much smaller, faster and worse than splatfacto, in one table and one picture.

For one dataset it trains (or takes existing runs of) splatfacto-portable, pup-gs (post-hoc, from the splatfacto
run's checkpoint, as the paper prunes a trained model) and vedal-gs, all through `ns-train` with the same split
and seeds, then evaluates every run on the same held-out views and reports PSNR, SSIM, LPIPS (when its weights are
available), Gaussian count, exported PLY size, render time per frame and FPS (median over the eval views after a
warm-up, on the device used), training time and scoring time. Writes results.json, results.md and compare.png.
Every pruned run is read against an unpruned run of the same budget and seed (`plan`). `--seeds` repeats every run
per seed; each cell is then the mean ± half the range over seeds. `--schedule-scale` multiplies every step count of
every method together (`schedule`), and is stated in every output.

The modules, each importing only those before it:
`config` (the options), `data` (the dataset), `progress` (following ns-train's log), `records` (runs, checkpoints,
per-row numbers), `schedule` (the methods' step counts, scaled), `plan` (the rows and the runs that make them),
`runner` (training and evaluation), `report` (table, json, plot, notes), `merge` (--merge), `cli` (the command).
"""

from nerfstudio_pruning.compare.cli import entrypoint, run
from nerfstudio_pruning.compare.config import METHODS, CompareConfig, CompareError
from nerfstudio_pruning.compare.plan import ROW_30K, ROW_40K, ROW_DENSIFY, Job, Plan, make_plan, parse_runs
from nerfstudio_pruning.compare.records import RunRecord, checkpoint_path, config_at_step, last_checkpoint
from nerfstudio_pruning.compare.report import table_notes
from nerfstudio_pruning.compare.schedule import Schedule, common_train_args, scaled

__all__ = ["METHODS", "ROW_30K", "ROW_40K", "ROW_DENSIFY", "CompareConfig", "CompareError", "Job", "Plan", "RunRecord",
           "Schedule", "checkpoint_path", "common_train_args", "config_at_step", "entrypoint", "last_checkpoint",
           "make_plan", "parse_runs", "run", "scaled", "table_notes"]
