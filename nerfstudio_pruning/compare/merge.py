"""`ns-prune-compare --merge A/results.json B/results.json`: one table from comparisons made apart.

Full schedules take hours on a CPU, so the seeds of one comparison are often trained in different sessions or on
different machines, and the run folders do not outlive them; their results.json files do. A merge rebuilds the
table, results.json and the PSNR-vs-size plot from the runs those files hold, with the same rows, means and spreads
a single comparison would show. Nothing is trained or evaluated, so the eval-view images are not drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from nerfstudio_pruning.compare.config import CompareConfig, CompareError
from nerfstudio_pruning.compare.records import SPREAD, RunRecord, absolute_scene, add_x_fewer, rows_of
from nerfstudio_pruning.compare.report import seeds_note, write_outputs

PATH_FIELDS = ("config", "eval_config")


def read_results(path: Path) -> dict:
    if not path.is_file():
        raise CompareError(f"--merge: no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"--merge: {path} is not a results.json ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"] or "schedule_scale" not in data:
        raise CompareError(f"--merge: {path} is not an ns-prune-compare results.json (no runs, or no schedule_scale)")
    return data


def record_of(run: dict, path: Path) -> RunRecord:
    known = set(RunRecord.__dataclass_fields__)
    try:
        fields = {k: v for k, v in run.items() if k in known}
        for key in PATH_FIELDS:  # compared as paths when one run is in two files
            if fields.get(key) is not None:
                fields[key] = Path(fields[key])
        record = RunRecord(**fields)
    except TypeError as err:
        raise CompareError(f"--merge: a run in {path} lacks a field ({err})") from None
    # x fewer is recomputed over the merged runs; a stale one would survive for a run whose baseline is missing.
    record.metrics = {k: v for k, v in record.metrics.items() if k != "x_fewer"}
    return record


def normalised(key: str, value):
    """A value as --merge compares it: scenes as absolute paths (files written before scenes were recorded absolute
    hold the path as typed, relative to the folder the comparison ran in: taken as this one)."""
    return absolute_scene(value) if key == "scene" and isinstance(value, str) else value


def merge(cfg: CompareConfig) -> List[RunRecord]:
    files = [Path(p) for p in cfg.merge]
    if len(set(p.resolve() for p in files)) != len(files):
        raise CompareError("--merge names a file twice")
    results = [(p, read_results(p)) for p in files]
    first_path, first = results[0]
    for path, data in results[1:]:
        for key in ("scene", "schedule_scale", "downscale_factor", "refine_scale"):
            if key in ("downscale_factor", "refine_scale") and not (key in data and key in first):
                continue  # files written before the factor was recorded
            if normalised(key, data.get(key)) != normalised(key, first.get(key)):
                raise CompareError(f"--merge: {path} has {key} {data.get(key)!r} but {first_path} has "
                                   f"{first.get(key)!r}; only comparisons of one scene and schedule can share a table")
    records: List[RunRecord] = []
    origin: Dict[Tuple[str, int], Tuple[Path, RunRecord]] = {}
    repeated: List[str] = []
    for path, data in results:
        for run in data["runs"]:
            record = record_of(run, path)
            key = (record.row, record.seed)
            if key in origin:
                seen_path, seen = origin[key]
                # One checkpoint evaluated by two comparisons (e.g. a seed's table and a two-seed table): one run.
                if (seen.config, seen.step) == (record.config, record.step):
                    repeated.append(record.label)
                    continue
                raise CompareError(f"--merge: row {record.row!r} seed {record.seed} is another run in {seen_path} "
                                   f"than in {path}; merge files whose runs differ")
            origin[key] = (path, record)
            records.append(record)
    # Rows in the order a single comparison would list them: first appearance across the files.
    order = list(dict.fromkeys(r.row for r in records))
    records.sort(key=lambda r: (order.index(r.row), r.seed))
    add_x_fewer(records)

    seeds = sorted({r.seed for r in records})
    devices = sorted({str(data.get("device")) for _, data in results})
    notes = [f"Merged from {len(files)} comparisons ({', '.join(str(p) for p in files)}), schedule scale "
             f"{first['schedule_scale']:.4g}; nothing re-evaluated. Each file's own notes are kept in results.json "
             "under merged_from; render ms were measured by each comparison on its own machine and load."]
    if len(seeds) > 1:
        notes.append(seeds_note(seeds))
    partial = [f"{row} (seed {', '.join(str(r.seed) for r in recs)})" for row, recs in rows_of(records).items()
               if len(recs) < len(seeds)]
    if partial:
        notes.append("Rows with fewer seeds than the table, so no spread: " + "; ".join(partial) + ".")
    if repeated:
        notes.append("The same checkpoint in several files, taken from the first: " + ", ".join(repeated) + ".")
    notes.append(f"Device: {', '.join(devices)}.")

    output_dir = cfg.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compare] merging {len(records)} runs from {len(files)} results.json files into {output_dir}", flush=True)
    payload = {
        "scene": normalised("scene", first.get("scene")),
        "downscale_factor": next((d["downscale_factor"] for _, d in results if "downscale_factor" in d), None),
        "dataparser": first.get("dataparser"), "random_init": first.get("random_init"),
        "schedule_scale": first["schedule_scale"], "refine_scale": first.get("refine_scale"),
        "schedule": first.get("schedule"), "device": ", ".join(devices),
        "seeds": seeds, "seed": seeds[0], "spread": SPREAD,
        "merged_from": [{"file": str(p), "seeds": data.get("seeds"), "device": data.get("device"),
                         "notes": data.get("notes", [])} for p, data in results],
    }
    write_outputs(output_dir, str(first.get("scene")), records, notes, payload, {}, float(first["schedule_scale"]))
    return records
