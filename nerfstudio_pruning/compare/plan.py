"""What a comparison trains and evaluates: the table of rows, and the ns-train runs (jobs) that make them.

The rows, in table order (`rows`): each names its ns-train method, the row it is read against and the arguments
that set it apart. Every pruned row is read against an unpruned row of the same step budget and seed:

- "splatfacto (30k)" and "splatfacto (40k)" are one splatfacto-portable run of the '30k' steps plus pup-gs's
  refinement, which keeps its '30k' checkpoint; pup-gs starts from that checkpoint, so it is read against the 40k
  row, and the 30k row is what it started from.
- "splatfacto (densify to 7k)" is splatfacto-portable trained as long as vedal-gs with densification, culling and
  opacity resets stopped where vedal-gs stops them (its fine-tuning start): vedal-gs is read against it.

The labels name the full schedule's step counts; the counts themselves come from the methods' configs
(`schedule.full_schedule`). `--runs` replaces the run of a row (per seed) by an existing one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nerfstudio_pruning.compare.config import METHODS, CompareConfig, CompareError
from nerfstudio_pruning.compare.records import RunRecord, checkpoint_path, checkpoint_steps
from nerfstudio_pruning.compare.schedule import Schedule, flag

ROW_30K = "splatfacto (30k)"
ROW_40K = "splatfacto (40k)"
ROW_DENSIFY = "splatfacto (densify to 7k)"
# --runs keys: the three methods and the densify-to-7k baseline; besides these, the row labels of the variants
# asked for (`variant_labels`).
RUN_KEYS = METHODS + ("splatfacto-densify",)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    label: str
    method: str
    """The ns-train method that makes it."""
    baseline: Optional[str] = None
    """The row it is read against."""
    args: Tuple[str, ...] = ()
    """ns-train arguments beside the schedule's."""
    kl_weight: Optional[float] = None
    """For the KL sweep's rows: the weight, drawn as a curve."""
    target_fraction: Optional[float] = None
    """For the target rows: the fraction of Gaussians asked for, drawn as the method's curve."""


def vedal_variants(cfg: CompareConfig) -> List[Row]:
    """The vedal-gs variant rows this comparison asks for: the gate ablation, the KL sweep, the gate caps."""
    variants: List[Row] = []
    if cfg.gate_ablation:
        variants.append(Row("vedal-gs-no-gate", "vedal-gs", ROW_DENSIFY, (f"--{flag('use_gate')}", "False")))
    variants += [Row(f"vedal-gs-kl{w:g}", "vedal-gs", ROW_DENSIFY, (f"--{flag('kl_weight')}", str(w)), kl_weight=w)
                 for w in cfg.kl_weights]
    variants += [Row(f"vedal-gs-cap{c:g}", "vedal-gs", ROW_DENSIFY, ("--pipeline.model.gate.max-eligible-fraction", str(c)))
                 for c in cfg.eligible_caps]
    return variants + target_rows(cfg, "vedal-gs", ROW_DENSIFY)


def target_rows(cfg: CompareConfig, method: str, baseline: str) -> List[Row]:
    """One row of `method` per --target-fractions entry, at its default settings otherwise."""
    return [Row(f"{method}-t{f:g}", method, baseline, (f"--{flag('target_fraction')}", str(f)), target_fraction=f)
            for f in cfg.target_fractions]


def pup_rows(cfg: CompareConfig) -> List[Row]:
    """One pup-gs row per score (the paper's, fisher, is the row called pup-gs), then one per target size."""
    keep = () if cfg.pup_target_fraction is None else (f"--{flag('target_fraction')}", str(cfg.pup_target_fraction))
    return [Row("pup-gs" if score == "fisher" else f"pup-gs-{score}", "pup-gs", ROW_40K,
                (f"--{flag('score')}", score) + keep)
            for score in cfg.pup_scores] + target_rows(cfg, "pup-gs", ROW_40K)


def rows(cfg: CompareConfig) -> List[Row]:
    """The table's rows for the methods asked for: pup-gs brings the 30k and 40k rows, vedal-gs the densify row."""
    table: List[Row] = []
    if "splatfacto-portable" in cfg.methods or "pup-gs" in cfg.methods:
        table += [Row(ROW_30K, "splatfacto-portable"), Row(ROW_40K, "splatfacto-portable")]
    if "pup-gs" in cfg.methods:
        table += pup_rows(cfg)
    if "vedal-gs" in cfg.methods:
        table += [Row(ROW_DENSIFY, "splatfacto-portable"), Row("vedal-gs", "vedal-gs", ROW_DENSIFY)] + vedal_variants(cfg)
    return table


def variant_labels(cfg: CompareConfig) -> List[str]:
    """Row labels of the variant runs this comparison asks for (the keys --runs accepts for them)."""
    labels = [row.label for row in pup_rows(cfg) if row.label != "pup-gs"]
    return labels + [row.label for row in vedal_variants(cfg)]


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
    after: Optional[str] = None
    """The label of the job this one starts from (it writes the checkpoint this one loads): trained first."""
    seconds: Optional[float] = None
    started_wall: Optional[float] = None
    log: Optional[Path] = None

    def config(self, cfg: CompareConfig, output_dir: Path) -> Path:
        return output_dir / "runs" / cfg.experiment_name / self.method / self.dirname / "config.yml"


@dataclass
class Plan:
    jobs: List[Job] = field(default_factory=list)
    records: List[RunRecord] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    step_views: List[Tuple[RunRecord, Path, int]] = field(default_factory=list)
    """Records evaluated at an earlier checkpoint of their run: (record, config to write, step)."""


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


def make_plan(cfg: CompareConfig, sched: Schedule, seeds: Tuple[int, ...], given: Dict[Tuple[str, int], Path],
              output_dir: Path, random_init: bool) -> Plan:
    plan = Plan()
    unused = dict(given)  # a given run no row takes would otherwise vanish from the table without a word

    def take(key: Tuple[str, int]) -> Optional[Path]:
        return unused.pop(key, None)

    extra_init = [f"--{flag('random_init')}", "True"] if random_init else []
    s30, s40 = sched.steps_30k, sched.steps_40k
    refine_total = sum(sched.refine)
    table = rows(cfg)
    for seed in seeds:
        tag = f"s{seed}"

        def job(label: str, method: str, dirname: str, max_steps: int, **kw) -> Job:
            j = Job(f"{label}/{tag}", method, seed, f"{dirname}-{tag}", max_steps, **kw)
            j.extra = extra_init + j.extra
            plan.jobs.append(j)
            return j

        def record(row: Row, config: Path, job: Optional[Job] = None) -> RunRecord:
            r = RunRecord(f"{row.label}/{tag}", row.label, row.method, seed, config, job=job.label if job else None,
                          baseline=row.baseline, kl_weight=row.kl_weight, target_fraction=row.target_fraction)
            plan.records.append(r)
            return r

        def at_30k(r30: RunRecord) -> None:
            plan.step_views.append((r30, output_dir / "step_configs" / f"splatfacto-30k-{tag}" / "config.yml", s30 - 1))

        start_30k: Optional[Path] = None  # the checkpoint pup-gs starts from
        start_job: Optional[str] = None  # the job that writes it, when this comparison trains it
        by_label = {row.label: row for row in table}
        if ROW_30K in by_label:
            row30, row40 = by_label[ROW_30K], by_label[ROW_40K]
            base = take(("splatfacto-portable", seed))
            if base is None:
                j40 = job(ROW_40K, "splatfacto-portable", "splatfacto-40k", s40,
                          steps_per_save=max(s30 - 1, 1), keep_all_checkpoints=True)
                config = j40.config(cfg, output_dir)
                at_30k(record(row30, config, j40))
                record(row40, config, j40)
                start_30k = checkpoint_path(config, s30 - 1)
                start_job = j40.label
            else:
                steps = checkpoint_steps(base)
                if s30 - 1 in steps and steps[-1] > s30 - 1:
                    # A 40k run that kept its 30k checkpoint.
                    at_30k(record(row30, base))
                    record(row40, base)
                    start_30k = checkpoint_path(base, s30 - 1)
                    if steps[-1] != s40 - 1:
                        plan.notes.append(f"The given splatfacto run {base} ends at step {steps[-1] + 1}, not {s40}.")
                else:
                    # A finished run: it is the 30k row, and continuing it gives the 40k row.
                    last = steps[-1]
                    start_30k = checkpoint_path(base, last)
                    record(row30, base)
                    j40 = job(ROW_40K, "splatfacto-portable", "splatfacto-40k-continued", refine_total,
                              extra=["--load-checkpoint", str(start_30k)], first_step=last + 1)
                    record(row40, j40.config(cfg, output_dir), j40)
                    if last != s30 - 1:
                        plan.notes.append(f"The given splatfacto run ({base}) ends at step {last + 1}, not at this "
                                          f"schedule's {s30}: its '30k' row has {last + 1} steps, the '40k' row "
                                          f"{last + 1 + refine_total}, and pup-gs starts from its step {last + 1}.")
        for row in table:
            if row.method == "pup-gs":
                pup = take((row.label, seed))
                if pup is not None:
                    record(row, pup)
                    continue
                first = int(start_30k.stem.split("-", 1)[1]) + 1
                j = job(row.label, "pup-gs", row.label, refine_total, first_step=first, after=start_job,
                        extra=["--load-checkpoint", str(start_30k), f"--{flag('refine_steps')}", *map(str, sched.refine),
                               *row.args])
                record(row, j.config(cfg, output_dir), j)
            elif row.label == ROW_DENSIFY:
                dens = take(("splatfacto-densify", seed))
                if dens is None:
                    j = job(ROW_DENSIFY, "splatfacto-portable", "splatfacto-densify-7k", sched.vedal_steps,
                            overrides={flag("stop_split_at"): str(sched.densify_stop)})
                    record(row, j.config(cfg, output_dir), j)
                else:
                    record(row, dens)
            elif row.method == "vedal-gs":
                # A variant not asked for has no label --runs accepts (parse_runs), so no given run is left untaken.
                given_run = take((row.label, seed))
                if given_run is not None:
                    record(row, given_run)
                    continue
                j = job(row.label, "vedal-gs", row.label, sched.vedal_steps, extra=sched.vedal_args() + list(row.args))
                record(row, j.config(cfg, output_dir), j)
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

