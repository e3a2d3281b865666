"""ns-prune-compare end to end on tiny runs: equal budgets, seeds, pruning.json, any dataset, refused scenes."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest
import yaml
from PIL import Image

from conftest import made_once
from e2e import BIN, ns

from nerfstudio_pruning.compare import CompareConfig, CompareError, parse_runs, run

# 1/1000 of the papers' schedules: splatfacto '30k' = 30 steps, '40k' = 40, pup-gs refines 5 + 5 steps.
TINY = "0.001"


def rows_of(results: dict) -> dict:
    rows: dict = {}
    for r in results["runs"]:
        rows.setdefault(r["row"], []).append(r)
    return rows


def load_config(path) -> dict:
    """A run's config.yml as plain data (no nerfstudio objects): the keys this test reads."""
    text = open(path).read()
    return yaml.load(text, Loader=yaml.Loader)


def ckpt_steps(config_path) -> list:
    from pathlib import Path

    folder = Path(config_path).parent / "nerfstudio_models"
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt"))


def test_compare_writes_table_json_and_plot(e2e_root, splatfacto_run, vedal_run, tmp_path):
    _, vedal = vedal_run
    out = tmp_path / "compare"
    proc = ns("ns-prune-compare", [
        "--scene", "default", "--output-dir", str(out), "--schedule-scale", TINY,
        "--runs", f"splatfacto-portable={splatfacto_run / 'config.yml'}", f"vedal-gs={vedal / 'config.yml'}",
    ], cwd=e2e_root)
    assert "| run | PSNR |" in proc.stdout and str(out / "compare.png") in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["schedule_scale"] == float(TINY) and results["device"] == "cpu"
    runs = {r["row"]: r for r in results["runs"]}
    assert set(runs) == {"splatfacto (30k)", "splatfacto (40k)", "pup-gs", "splatfacto (densify to 7k)", "vedal-gs"}
    for r in runs.values():
        m = r["metrics"]
        for key in ("psnr", "ssim", "num_gaussians", "ply_mb", "render_ms", "fps"):
            assert math.isfinite(m[key]) and m[key] > 0, (r["label"], key, m[key])
        assert 5 < m["psnr"] < 60 and 0 < m["ssim"] <= 1
    # The given 150-step run is the starting point (its '30k' row), as before.
    base = runs["splatfacto (30k)"]["metrics"]
    for pruned in ("pup-gs", "vedal-gs"):
        assert runs[pruned]["metrics"]["num_gaussians"] < base["num_gaussians"]
        assert runs[pruned]["metrics"]["ply_mb"] < base["ply_mb"]
    assert runs["pup-gs"]["train_seconds"] > 0 and runs["pup-gs"]["scoring_seconds"] > 0
    # 80% then 50% of the splatfacto run's Gaussians
    assert abs(runs["pup-gs"]["metrics"]["num_gaussians"] - 0.1 * base["num_gaussians"]) <= 2
    # pup-gs and the 40k row both continue the given run (last step 149) for 5 + 5 steps.
    assert runs["splatfacto (30k)"]["step"] == 149
    assert runs["splatfacto (40k)"]["step"] == runs["pup-gs"]["step"] == 159
    assert runs["pup-gs"]["baseline"] == "splatfacto (40k)"
    assert runs["vedal-gs"]["baseline"] == "splatfacto (densify to 7k)"
    x = runs["pup-gs"]["metrics"]["x_fewer"]
    assert x == pytest.approx(runs["splatfacto (40k)"]["metrics"]["num_gaussians"] / runs["pup-gs"]["metrics"]["num_gaussians"])
    # The densify-to-7k baseline: 30 steps ('30k' x 0.001), densification stopped at vedal-gs's fine-tuning start.
    dens = load_config(runs["splatfacto (densify to 7k)"]["config"])
    assert dens.max_num_iterations == 30 and dens.pipeline.model.stop_split_at == 7
    assert ckpt_steps(runs["splatfacto (densify to 7k)"]["config"])[-1] == 29

    table = (out / "results.md").read_text()
    assert f"Schedule scale {TINY}" in table and table.count("\n| ") >= 6
    assert "Read pup-gs against splatfacto (40k)" in table and "Read vedal-gs against splatfacto (densify to 7k)" in table
    with Image.open(out / "compare.png") as im:
        assert im.width > 600 and im.height > 200


@pytest.fixture(scope="session")
def two_seeds(e2e_root, default_scene):
    """splatfacto (one 40-step run per seed, keeping step 29) and pup-gs (opacity score) from its step-29 checkpoint,
    seeds 0 and 1. Session-scoped and made once: under pytest-xdist a module fixture is torn down whenever its
    worker turns to another module's test, and this one takes minutes."""
    out = e2e_root / "compare-seeds"
    proc = made_once(e2e_root, "compare_two_seeds", lambda: ns("ns-prune-compare", [
        "--scene", "default", "--output-dir", str(out), "--schedule-scale", TINY, "--seeds", "0", "1",
        # The opacity score: pup-gs's rounds and budgets without Fisher scoring's minutes on a shared CPU.
        "--methods", "splatfacto-portable", "pup-gs", "--pup-scores", "opacity",
    ], cwd=e2e_root))
    return proc, out


def test_equal_budgets_and_seeds(two_seeds):
    proc, out = two_seeds
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["schedule"]["steps_30k"] == 30 and results["schedule"]["steps_40k"] == 40
    rows = rows_of(results)
    assert list(rows) == ["splatfacto (30k)", "splatfacto (40k)", "pup-gs-opacity"]
    for row, recs in rows.items():
        assert sorted(r["seed"] for r in recs) == [0, 1], row
        assert sorted(r["label"] for r in recs) == [f"{row}/s0", f"{row}/s1"]
        agg = results["rows"][row]["metrics"]["psnr"]
        values = [r["metrics"]["psnr"] for r in recs]
        assert agg["n"] == 2 and agg["mean"] == pytest.approx(sum(values) / 2)
        assert agg["spread"] == pytest.approx(abs(values[0] - values[1]) / 2)

    for seed in (0, 1):
        r30, r40 = (next(r for r in rows[row] if r["seed"] == seed) for row in ("splatfacto (30k)", "splatfacto (40k)"))
        pup = next(r for r in rows["pup-gs-opacity"] if r["seed"] == seed)
        # One 40-step run that kept its step-29 checkpoint: the 30k row is evaluated there, the 40k row at its end.
        assert r30["config"] == r40["config"] and r30["step"] == 29 and r40["step"] == 39
        assert {29, 39} <= set(ckpt_steps(r40["config"]))
        run = load_config(r40["config"])
        assert run.max_num_iterations == 40 and run.machine.seed == seed
        assert run.pipeline.datamanager.train_cameras_sampling_seed == seed  # the view order follows the seed too
        assert run.optimizers["means"]["scheduler"].max_steps == 30  # the 30k schedule, as in a 30k run
        # pup-gs: 10 steps from that checkpoint, 40 in all.
        assert pup["step"] == 39 and ckpt_steps(pup["config"])[-1] == 39
        pup_config = load_config(pup["config"])
        assert str(pup_config.load_checkpoint).endswith(f"splatfacto-40k-s{seed}/nerfstudio_models/step-000000029.ckpt")
        assert pup_config.max_num_iterations == 10 and pup_config.machine.seed == seed
        assert pup["scoring_seconds"] >= 0 and pup["scoring_source"] in ("pruning.json", "log")
        assert abs(pup["metrics"]["num_gaussians"] - 0.1 * r30["metrics"]["num_gaussians"]) <= 2
        assert pup["metrics"]["x_fewer"] == pytest.approx(r40["metrics"]["num_gaussians"] / pup["metrics"]["num_gaussians"])

    table = (out / "results.md").read_text()
    pup_line = next(line for line in table.splitlines() if line.startswith("| pup-gs-opacity |"))
    assert pup_line.count(" ± ") >= 8  # PSNR, SSIM, Gaussians, x fewer, PLY MB, render ms, FPS, train s, scoring s
    assert "half the range" in table and "Seeds 0, 1" in table
    # Plain progress lines when not on a terminal; on a CPU two runs train at once, so the order of starts may vary.
    assert re.search(r"\[compare\] training \[[34]/4\] pup-gs-opacity/s1 ", proc.stdout), proc.stdout


def test_lpips_is_omitted_in_one_line_without_a_download(two_seeds):
    proc, out = two_seeds
    text = proc.stdout + proc.stderr
    computed = all("lpips" in r["metrics"] for r in json.loads((out / "results.json").read_text())["runs"])
    assert "Downloading" not in text and text.count("LPIPS omitted") == (0 if computed else 1), text[-3000:]


def _copy_run(config, dest):
    """A run folder holding a copy of config.yml (and a link to the original checkpoints), for a fake pruning.json."""
    dest.mkdir(parents=True)
    shutil.copy(config, dest / "config.yml")
    (dest / "nerfstudio_models").symlink_to(config.parent / "nerfstudio_models")
    return dest / "config.yml"


def test_pruning_json_is_used(e2e_root, two_seeds, splatfacto_run, vedal_run, tmp_path):
    _, seeds_out = two_seeds
    results = json.loads((seeds_out / "results.json").read_text())
    rows = rows_of(results)
    from pathlib import Path

    base40 = next(r for r in rows["splatfacto (40k)"] if r["seed"] == 0)["config"]
    pup = _copy_run(Path(next(r for r in rows["pup-gs-opacity"] if r["seed"] == 0)["config"]), tmp_path / "pup")
    vedal = _copy_run(vedal_run[1] / "config.yml", tmp_path / "vedal")
    (pup.parent / "pruning.json").write_text(json.dumps({
        "method": "pup-gs", "final_gaussians": 1,
        "rounds": [{"step": 30, "score": "fisher", "gaussians_before": 10, "gaussians_after": 2, "scoring_seconds": 40.0},
                   {"step": 35, "score": "fisher", "gaussians_before": 2, "gaussians_after": 1, "scoring_seconds": 3.0}]}))
    (vedal.parent / "pruning.json").write_text(json.dumps({
        "method": "vedal-gs", "importance_seconds": 7.5, "importance_passes": 9,
        "gate": {"eligible_fraction": 0.5, "grants": 123, "reversals": 4}, "hard_prune": None, "final_gaussians": 1}))
    out = tmp_path / "compare"
    ns("ns-prune-compare", [
        "--scene", "default", "--output-dir", str(out), "--schedule-scale", TINY, "--seeds", "0",
        "--runs", f"splatfacto-portable={base40}", f"pup-gs={pup}", f"vedal-gs={vedal}",
        f"splatfacto-densify={splatfacto_run / 'config.yml'}", f"pup-gs-opacity={pup}", "--pup-scores", "fisher", "opacity",
    ], cwd=e2e_root)
    results = json.loads((out / "results.json").read_text())
    runs = {r["row"]: r for r in results["runs"]}
    assert "pup-gs-opacity" in runs and runs["pup-gs-opacity"]["baseline"] == "splatfacto (40k)"
    assert all(r["train_seconds"] is None for r in runs.values())  # nothing was trained
    assert runs["pup-gs"]["scoring_seconds"] == 43.0 and runs["pup-gs"]["scoring_source"] == "pruning.json"
    assert runs["vedal-gs"]["scoring_seconds"] == 7.5 and runs["vedal-gs"]["gate"] == {
        "eligible_fraction": 0.5, "grants": 123, "reversals": 4}
    table = (out / "results.md").read_text()
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["pup-gs"].rstrip(" |").endswith("| 43.0") and lines["vedal-gs"].rstrip(" |").endswith("| 7.5")
    assert "read from each run's pruning.json" in table and "no pruning.json" not in table


@pytest.mark.parametrize("case", ["missing", "empty", "no-images", "file", "missing-images"])
def test_bad_scene_is_refused_in_one_line(case, tmp_path):
    scene = tmp_path / "scene"
    if case == "empty":
        scene.mkdir()
    elif case == "no-images":
        (scene / "sparse" / "0").mkdir(parents=True)
        for name in ("cameras.bin", "images.bin"):
            (scene / "sparse" / "0" / name).write_bytes(b"")
    elif case == "file":
        scene.write_text("not a folder")
    elif case == "missing-images":
        scene.mkdir()
        (scene / "transforms.json").write_text(json.dumps({"frames": [{"file_path": "images/a.png"}]}))
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "ns-prune-compare"), "--scene", str(scene), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def blender_scene(default_scene, dest):
    """The built-in scene rewritten as a blender-data dataset (transforms_{train,val,test}.json, no seed points)."""
    meta = json.loads((default_scene / "transforms.json").read_text())
    shutil.copytree(default_scene / "images", dest / "images")
    frames = {f["file_path"]: f["transform_matrix"] for f in meta["frames"]}
    scale = max(abs(m[i][3]) for m in frames.values() for i in range(3))
    angle = 2 * math.atan(meta["w"] / (2 * meta["fl_x"]))
    for split in ("train", "val", "test"):
        names = meta[f"{split}_filenames"]
        out = [{"file_path": name[: -len(".png")],
                "transform_matrix": [row[:3] + [row[3] / scale if i < 3 else row[3]] for i, row in enumerate(frames[name])]}
               for name in names]
        (dest / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": out}))
    return dest


def test_blender_dataset_is_accepted(e2e_root, default_scene, tmp_path):
    scene = blender_scene(default_scene, tmp_path / "blender")
    out = tmp_path / "compare"
    # The smallest schedule (10 + 2 steps): what is tested is the dataset's reading, and a step costs ~50k random
    # points' render.
    proc = ns("ns-prune-compare", ["--scene", str(scene), "--output-dir", str(out), "--schedule-scale", "0.0002",
                                   "--methods", "splatfacto-portable"], cwd=e2e_root)
    results = json.loads((out / "results.json").read_text())
    assert results["dataparser"] == "blender-data" and results["random_init"] is True
    runs = {r["row"]: r for r in results["runs"]}
    assert set(runs) == {"splatfacto (30k)", "splatfacto (40k)"}
    config = load_config(runs["splatfacto (40k)"]["config"])
    assert type(config.pipeline.datamanager.dataparser).__name__ == "BlenderDataParserConfig"
    assert config.pipeline.model.random_init is True
    assert runs["splatfacto (40k)"]["metrics"]["psnr"] > 5
    assert "random init" in (out / "results.md").read_text() and "| splatfacto (40k) |" in proc.stdout


def test_runs_of_variants_must_be_asked_for(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text("")
    (tmp_path / "nerfstudio_models").mkdir()
    (tmp_path / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"")
    asked = CompareConfig(output_dir=tmp_path, pup_scores=("fisher", "speedy"), kl_weights=(2.0,),
                          eligible_caps=(0.95,),
                          runs=(f"pup-gs-speedy={config}", f"vedal-gs-kl2={config}", f"vedal-gs-cap0.95={config}"))
    assert set(parse_runs(asked, (42,))) == {("pup-gs-speedy", 42), ("vedal-gs-kl2", 42), ("vedal-gs-cap0.95", 42)}
    for item in (f"pup-gs-random={config}", f"vedal-gs-kl3={config}", f"vedal-gs-no-gate={config}",
                 f"vedal-gs-cap0.9={config}"):
        with pytest.raises(CompareError, match="--runs expects KEY=path/to/config.yml"):
            parse_runs(CompareConfig(output_dir=tmp_path, pup_scores=("fisher", "speedy"), runs=(item,)), (42,))


def test_a_given_run_no_row_takes_is_refused(tmp_path):
    """--runs pup-gs=... is the Fisher row: with 'fisher' left out of --pup-scores it must not vanish silently."""
    from nerfstudio_pruning.compare import Schedule, make_plan

    config = tmp_path / "config.yml"
    config.write_text("")
    (tmp_path / "nerfstudio_models").mkdir()
    (tmp_path / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"")
    given = {("splatfacto-portable", 42): config, ("pup-gs", 42): config}
    sched = Schedule.of(float(TINY))
    taken = make_plan(CompareConfig(output_dir=tmp_path, methods=("pup-gs",)), sched, (42,), given, tmp_path, False)
    assert "pup-gs" in {r.row for r in taken.records}
    for cfg in (CompareConfig(output_dir=tmp_path, methods=("pup-gs",), pup_scores=("lightgaussian",)),
                CompareConfig(output_dir=tmp_path, methods=("vedal-gs",))):
        with pytest.raises(CompareError, match=r"--runs .*pup-gs/s42.*: no row of this comparison takes it"):
            make_plan(cfg, sched, (42,), given, tmp_path, False)


def test_vedal_variants_train_with_their_own_knob(tmp_path):
    """A KL-sweep row passes its weight and a cap row its gate cap to ns-train, each beside the default vedal-gs."""
    from types import SimpleNamespace

    from nerfstudio_pruning.compare import Schedule, make_plan, table_notes

    cfg = CompareConfig(output_dir=tmp_path, methods=("vedal-gs",), kl_weights=(2.0,), eligible_caps=(0.95,),
                        gate_ablation=True)
    plan = make_plan(cfg, Schedule.of(float(TINY)), (42,), {}, tmp_path, False)
    extra = {j.label: j.extra for j in plan.jobs}
    assert set(extra) == {"splatfacto (densify to 7k)/s42", "vedal-gs/s42", "vedal-gs-kl2/s42", "vedal-gs-cap0.95/s42",
                          "vedal-gs-no-gate/s42"}

    def value(args, option):
        return args[args.index(option) + 1] if option in args else None

    assert value(extra["vedal-gs-kl2/s42"], "--pipeline.model.kl-weight") == "2.0"
    assert value(extra["vedal-gs-cap0.95/s42"], "--pipeline.model.gate.max-eligible-fraction") == "0.95"
    assert value(extra["vedal-gs-cap0.95/s42"], "--pipeline.model.kl-weight") is None
    assert value(extra["vedal-gs/s42"], "--pipeline.model.gate.max-eligible-fraction") is None
    records = {r.row: r for r in plan.records}
    assert records["vedal-gs-cap0.95"].baseline == "splatfacto (densify to 7k)"
    assert records["vedal-gs-cap0.95"].kl_weight is None  # a point of its own, not on the KL sweep's curve
    scene = SimpleNamespace(name="default", dataparser="nsp-default-scene", random_init=False, notes=[])
    notes = table_notes(cfg, Schedule.of(float(TINY)), scene, (42,), plan.records, [], {j.label: j for j in plan.jobs})
    assert any(note.startswith("vedal-gs-capC: vedal-gs at its default KL weight") for note in notes)
    assert value(extra["vedal-gs-no-gate/s42"], "--pipeline.model.use-gate") == "False"
    assert any(note.startswith("vedal-gs-no-gate: the paper's ablation") for note in notes)


def test_target_rows_train_each_method_at_its_target_and_report_asked_against_obtained(tmp_path):
    """--target-fractions adds one row per method and fraction, passing the fraction to ns-train beside the
    default rows; the table's 'asked' column is the size the run resolved (pruning.json), drawn as curves."""
    from types import SimpleNamespace

    from nerfstudio_pruning.compare import Schedule, make_plan, table_notes
    from nerfstudio_pruning.compare.report import draw, markdown_table

    cfg = CompareConfig(output_dir=tmp_path, target_fractions=(0.2, 0.05))
    sched = Schedule.of(float(TINY))
    plan = make_plan(cfg, sched, (42,), {}, tmp_path, False)
    jobs = {j.label: j for j in plan.jobs}
    for method in ("pup-gs", "vedal-gs"):
        for f in ("0.2", "0.05"):
            extra = jobs[f"{method}-t{f}/s42"].extra
            assert extra[extra.index("--pipeline.model.target-fraction") + 1] == f
        assert "--pipeline.model.target-fraction" not in jobs[f"{method}/s42"].extra
    assert jobs["pup-gs-t0.2/s42"].extra[:2] == jobs["pup-gs/s42"].extra[:2]  # the same 30k checkpoint
    records = {r.row: r for r in plan.records}
    assert records["pup-gs-t0.2"].baseline == "splatfacto (40k)" and records["pup-gs-t0.2"].target_fraction == 0.2
    assert records["vedal-gs-t0.05"].baseline == "splatfacto (densify to 7k)"

    for i, r in enumerate(plan.records):
        r.metrics = {"psnr": 20.0 + i, "ssim": 0.8, "num_gaussians": 1000.0 / (i + 1)}
    records["pup-gs-t0.2"].pruning = {"method": "pup-gs", "target_gaussians": 300}
    scene = SimpleNamespace(name="default", dataparser="nsp-default-scene", random_init=False, notes=[])
    notes = table_notes(cfg, sched, scene, (42,), plan.records, [], jobs)
    assert any(n.startswith("pup-gs-tF, vedal-gs-tF (F = 0.2, 0.05)") for n in notes)
    table = markdown_table(plan.records, notes)
    header = table.splitlines()[0]
    assert "| asked |" in header
    line = next(row for row in table.splitlines() if row.startswith("| pup-gs-t0.2 |"))
    assert line.split("|")[header.split("|").index(" asked ")].strip() == "300"
    assert "| asked |" not in markdown_table([r for r in plan.records if r.row != "pup-gs-t0.2"], notes)
    draw(plan.records, {}, tmp_path / "compare.png", sched.scale)
    assert (tmp_path / "compare.png").stat().st_size > 0

    given = tmp_path / "given" / "config.yml"
    given.parent.mkdir()
    given.write_text("")
    (given.parent / "nerfstudio_models").mkdir()
    (given.parent / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"")
    assert set(parse_runs(CompareConfig(output_dir=tmp_path, target_fractions=(0.2,),
                                        runs=(f"vedal-gs-t0.2={given}",)), (42,))) == {("vedal-gs-t0.2", 42)}


@pytest.mark.parametrize("fractions, pup_keep, methods, message", [
    ((0.0,), None, ("pup-gs",), r"--target-fractions are fractions of the Gaussians to keep, in \(0, 1\), got 0"),
    ((1.0,), None, ("vedal-gs",), r"--target-fractions are fractions of the Gaussians to keep, in \(0, 1\), got 1"),
    ((0.1,), None, ("splatfacto-portable",), "--target-fractions: pup-gs and vedal-gs rows, and --methods leaves both out"),
    ((), 1.0, ("pup-gs",), r"--pup-target-fraction is the fraction of the Gaussians pup-gs keeps, in \(0, 1\), got 1"),
])
def test_unusable_target_fractions_are_refused(fractions, pup_keep, methods, message, tmp_path):
    with pytest.raises(CompareError, match=message):
        run(CompareConfig(output_dir=tmp_path / "out", methods=methods, target_fractions=fractions,
                          pup_target_fraction=pup_keep))
    assert not (tmp_path / "out").exists()


def test_pup_target_fraction_sets_every_pup_row_and_the_table_says_so(tmp_path):
    """--pup-target-fraction (the demo's 0.5) passes the fraction to each score's pup-gs run, not to the target
    rows (they keep their own) nor to vedal-gs, and a note says that pup-gs is not at the paper's 10%."""
    from types import SimpleNamespace

    from nerfstudio_pruning.compare import Schedule, make_plan, table_notes

    cfg = CompareConfig(output_dir=tmp_path, pup_target_fraction=0.5, pup_scores=("fisher", "opacity"),
                        target_fractions=(0.2,))
    sched = Schedule.of(float(TINY))
    plan = make_plan(cfg, sched, (42,), {}, tmp_path, False)
    jobs = {j.label: j for j in plan.jobs}

    def fractions(label):
        extra = jobs[label].extra
        return [extra[i + 1] for i, a in enumerate(extra) if a == "--pipeline.model.target-fraction"]

    assert fractions("pup-gs/s42") == ["0.5"] and fractions("pup-gs-opacity/s42") == ["0.5"]
    assert fractions("pup-gs-t0.2/s42") == ["0.2"] and fractions("vedal-gs/s42") == []
    scene = SimpleNamespace(name="default", dataparser="nsp-default-scene", random_init=False, notes=[])
    notes = table_notes(cfg, sched, scene, (42,), plan.records, [], jobs)
    assert any(n.startswith("pup-gs keeps 50% of the model it prunes (--pup-target-fraction 0.5") for n in notes)
    # The demo passes it whatever --methods its user adds: without pup-gs it changes nothing.
    vedal_only = CompareConfig(output_dir=tmp_path, methods=("vedal-gs",), pup_target_fraction=0.5)
    assert all("--pipeline.model.target-fraction" not in j.extra
               for j in make_plan(vedal_only, sched, (42,), {}, tmp_path, False).jobs)
    default = CompareConfig(output_dir=tmp_path)
    assert not any("--pup-target-fraction" in n for n in table_notes(
        default, sched, scene, (42,), make_plan(default, sched, (42,), {}, tmp_path, False).records, [], jobs))


def test_vedal_variants_without_vedal_gs_are_refused(tmp_path):
    with pytest.raises(CompareError, match="--kl-weights, --eligible-caps: vedal-gs rows, and --methods leaves vedal-gs out"):
        run(CompareConfig(output_dir=tmp_path / "out", methods=("pup-gs",), kl_weights=(2.0,), eligible_caps=(0.9,)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cap", [0.0, 1.5])
def test_an_eligible_cap_outside_0_1_is_refused(cap, tmp_path):
    with pytest.raises(CompareError, match=r"--eligible-caps are fractions of the Gaussians in \(0, 1\]"):
        run(CompareConfig(output_dir=tmp_path / "out", methods=("vedal-gs",), eligible_caps=(cap,)))
    assert not (tmp_path / "out").exists()


def test_30k_row_is_a_30k_run(e2e_root, two_seeds, tmp_path):
    """The 40-step run's step-29 checkpoint (the '30k' row, pup-gs's start) is what a 30-step run ends with."""
    import torch

    from nerfstudio_pruning.compare import CompareConfig, common_train_args

    _, out = two_seeds
    cfg = CompareConfig(output_dir=tmp_path, schedule_scale=float(TINY), device="cpu")
    ns("ns-train", ["splatfacto-portable", *common_train_args(cfg, "only-30k", 30, tmp_path, seed=0),
                    "nsp-default-scene", "--data", str(out / "scene")], cwd=e2e_root)
    ckpt = "nerfstudio_models/step-000000029.ckpt"
    alone = torch.load(tmp_path / "runs" / "compare" / "splatfacto-portable" / "only-30k" / ckpt, weights_only=False)
    within = torch.load(out / "runs" / "compare" / "splatfacto-portable" / "splatfacto-40k-s0" / ckpt, weights_only=False)
    assert alone["step"] == within["step"] == 29
    a, b = alone["pipeline"], within["pipeline"]
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key


def comparison_file(path, seed, rows, scale=1.0, scene="default", **fields):
    """A results.json as ns-prune-compare writes it, holding one run per row: {row: (method, baseline, psnr, n)}."""
    runs = [{"label": f"{row}/s{seed}", "row": row, "method": method, "seed": seed, "config": f"/gone/{row}/config.yml",
             "baseline": baseline, "scoring_seconds": 2.0 if baseline else None,
             "metrics": {"psnr": psnr, "num_gaussians": float(n), "x_fewer": 99.0}}
            for row, (method, baseline, psnr, n) in rows.items()]
    path.write_text(json.dumps({"scene": scene, "dataparser": "nsp-default-scene", "schedule_scale": scale,
                                "device": "cpu", "seeds": [seed], "runs": runs, "notes": [f"seed {seed} note"],
                                **fields}))
    return path


def test_merge_makes_one_table_from_comparisons_made_apart(tmp_path):
    from nerfstudio_pruning.compare import run

    a = comparison_file(tmp_path / "a.json", 42, {"splatfacto (40k)": ("splatfacto-portable", None, 25.0, 1000),
                                                  "pup-gs": ("pup-gs", "splatfacto (40k)", 24.0, 100),
                                                  "pup-gs-random": ("pup-gs", "splatfacto (40k)", 23.0, 100)})
    # b also holds seed 42's baseline, the same run as a's (as a two-seed table holds a one-seed table's runs).
    b = comparison_file(tmp_path / "b.json", 43, {"splatfacto (40k)": ("splatfacto-portable", None, 26.0, 2000),
                                                  "pup-gs": ("pup-gs", "splatfacto (40k)", 25.0, 250)})
    data = json.loads(b.read_text())
    data["runs"].append(json.loads(a.read_text())["runs"][0])
    b.write_text(json.dumps(data))
    out = tmp_path / "merged"
    run(CompareConfig(merge=(a, b), output_dir=out))
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [42, 43] and [m["notes"] for m in results["merged_from"]] == [["seed 42 note"], ["seed 43 note"]]
    pup = results["rows"]["pup-gs"]["metrics"]
    assert pup["psnr"]["mean"] == pytest.approx(24.5) and pup["psnr"]["spread"] == pytest.approx(0.5)
    # x fewer is recomputed per seed against the merged baseline, not carried over from the files.
    assert sorted(pup["x_fewer"]["values"]) == pytest.approx([8.0, 10.0])
    table = (out / "results.md").read_text()
    assert "| pup-gs | 24.50 ± 0.50 |" in table and "pup-gs-random (seed 42)" in table
    assert "several files, taken from the first: splatfacto (40k)/s42" in table and len(results["runs"]) == 5
    assert Image.open(out / "compare.png").size[0] > 100


def test_merge_takes_a_scene_typed_relative_and_absolute_as_one(tmp_path, monkeypatch):
    from nerfstudio_pruning.compare import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scene").mkdir()
    rows = {"splatfacto (40k)": ("splatfacto-portable", None, 25.0, 1000)}
    a = comparison_file(tmp_path / "a.json", 42, rows, scene="scene")  # as typed on the command line
    b = comparison_file(tmp_path / "b.json", 43, rows, scene=str(tmp_path / "scene"), downscale_factor=4)
    run(CompareConfig(merge=(a, b), output_dir=tmp_path / "merged"))
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["seeds"] == [42, 43]


@pytest.mark.parametrize("case", ["same-row-other-run", "other-schedule", "other-downscale", "other-scene",
                                  "not-results", "missing"])
def test_merge_refuses_files_that_do_not_share_a_table(case, tmp_path):
    a = comparison_file(tmp_path / "a.json", 42, {"splatfacto (40k)": ("splatfacto-portable", None, 25.0, 1000)})
    b = tmp_path / "b.json"
    if case == "same-row-other-run":
        comparison_file(b, 42, {"splatfacto (40k)": ("splatfacto-portable", None, 26.0, 1000)})
        data = json.loads(b.read_text())
        data["runs"][0]["config"] = "/elsewhere/config.yml"
        b.write_text(json.dumps(data))
    elif case == "other-schedule":
        comparison_file(b, 43, {"splatfacto (40k)": ("splatfacto-portable", None, 26.0, 1000)}, scale=1 / 30)
    elif case in ("other-downscale", "other-scene"):
        fields = {"downscale_factor": 2} if case == "other-downscale" else {"scene": str(tmp_path / "elsewhere")}
        comparison_file(a, 42, {"splatfacto (40k)": ("splatfacto-portable", None, 25.0, 1000)}, downscale_factor=4)
        comparison_file(b, 43, {"splatfacto (40k)": ("splatfacto-portable", None, 26.0, 1000)},
                        **{"downscale_factor": 4, **fields})
    elif case == "not-results":
        b.write_text("{\"rows\": {}}")
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "ns-prune-compare"), "--merge", str(a), str(b), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --merge") and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_train_false_evaluates_the_given_runs_only(two_seeds, e2e_root, tmp_path):
    _, runs_dir = two_seeds
    first = json.loads((runs_dir / "results.json").read_text())
    config = {r["row"]: r["config"] for r in first["runs"] if r["seed"] == 0}
    out = tmp_path / "given"
    proc = ns("ns-prune-compare", [
        "--scene", "default", "--output-dir", str(out), "--schedule-scale", TINY, "--seeds", "0", "--no-train",
        "--methods", "splatfacto-portable", "pup-gs", "vedal-gs", "--pup-scores", "opacity",
        "--runs", f"splatfacto-portable={config['splatfacto (40k)']}", f"pup-gs-opacity={config['pup-gs-opacity']}",
    ], cwd=e2e_root)
    results = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in results["runs"]] == ["splatfacto (30k)", "splatfacto (40k)", "pup-gs-opacity"]
    assert not (out / "runs").exists() and "training" not in proc.stdout
    # The same checkpoints evaluated again: the same numbers as the comparison that trained them.
    before = {r["row"]: r["metrics"]["psnr"] for r in first["runs"] if r["seed"] == 0}
    for r in results["runs"]:
        assert r["metrics"]["psnr"] == pytest.approx(before[r["row"]], abs=1e-4), r["row"]
    notes = (out / "results.md").read_text()
    assert "left out" in notes and "vedal-gs/s0" in notes and "splatfacto (densify to 7k)/s0" in notes


def test_train_false_without_runs_is_refused(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "ns-prune-compare"), "--no-train", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --no-train needs --runs: nothing to evaluate"], proc.stderr
    assert not out.exists()


def test_compare_modules_import_only_those_before_them():
    """The package's order (its docstring): no module imports a later one, so there is no import loop, and none
    imports the package itself (whose __init__ imports them all)."""
    import ast
    from pathlib import Path

    import nerfstudio_pruning.compare as package

    order = ["config", "data", "progress", "records", "schedule", "plan", "runner", "report", "merge", "cli"]
    folder = Path(package.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("__")) == sorted(order)
    for position, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        inside = {m.rsplit(".", 1)[1] if m != "nerfstudio_pruning.compare" else "__init__"
                  for m in imported if m == "nerfstudio_pruning.compare" or m.startswith("nerfstudio_pruning.compare.")}
        assert inside <= set(order[:position]), (name, sorted(inside - set(order[:position])))


def test_the_schedule_is_the_methods_defaults():
    """At scale 1 the comparison's step counts are what ns-train runs by default, read from the configs."""
    from nerfstudio_pruning.compare import Schedule
    from nerfstudio_pruning.methods.registry import splatfacto_portable
    from nerfstudio_pruning.pup.schedule import PupScheduleConfig
    from nerfstudio_pruning.vedal.controller import VedalConfig

    full = Schedule.of(1.0)
    assert full.steps_30k == splatfacto_portable.config.max_num_iterations
    assert full.refine == tuple(PupScheduleConfig().refine_steps) and full.refine_scale == 1.0
    assert full.densify_stop == VedalConfig().finetune_start_step and full.vedal_steps == VedalConfig().hard_prune_step + 1
    assert full.importance_every == VedalConfig().importance_every
    apart = Schedule.of(0.01, refine_scale=0.1)
    assert apart.steps_30k == round(0.01 * full.steps_30k) and apart.refine == tuple(round(0.1 * s) for s in full.refine)
    assert apart.steps_40k == apart.steps_30k + sum(apart.refine)
