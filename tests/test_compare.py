"""ns-prune-compare end to end on tiny runs: it trains pup-gs from the splatfacto run, evaluates, exports, reports."""

from __future__ import annotations

import json
import math

from PIL import Image

from e2e import ns


def test_compare_writes_table_json_and_plot(e2e_root, splatfacto_run, vedal_run, tmp_path):
    _, vedal = vedal_run
    out = tmp_path / "compare"
    proc = ns("ns-prune-compare", [
        "--scene", "default", "--output-dir", str(out), "--schedule-scale", "0.002",
        "--runs", f"splatfacto-portable={splatfacto_run / 'config.yml'}", f"vedal-gs={vedal / 'config.yml'}",
    ], cwd=e2e_root)
    assert "| run | PSNR |" in proc.stdout and str(out / "compare.png") in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["schedule_scale"] == 0.002 and results["device"] == "cpu"
    runs = {r["label"]: r for r in results["runs"]}
    assert set(runs) == {"splatfacto-portable", "pup-gs", "vedal-gs"}
    for r in runs.values():
        m = r["metrics"]
        for key in ("psnr", "ssim", "num_gaussians", "ply_mb", "render_ms", "fps"):
            assert math.isfinite(m[key]) and m[key] > 0, (r["label"], key, m[key])
        assert 5 < m["psnr"] < 60 and 0 < m["ssim"] <= 1
    base = runs["splatfacto-portable"]["metrics"]
    for pruned in ("pup-gs", "vedal-gs"):
        assert runs[pruned]["metrics"]["num_gaussians"] < base["num_gaussians"]
        assert runs[pruned]["metrics"]["ply_mb"] < base["ply_mb"]
    assert runs["pup-gs"]["train_seconds"] > 0 and runs["pup-gs"]["scoring_seconds"] > 0
    # 80% then 50% of the splatfacto run's Gaussians
    assert abs(runs["pup-gs"]["metrics"]["num_gaussians"] - 0.1 * base["num_gaussians"]) <= 2

    table = (out / "results.md").read_text()
    assert "Schedule scale 0.002" in table and table.count("\n| ") >= 4
    with Image.open(out / "compare.png") as im:
        assert im.width > 600 and im.height > 200
