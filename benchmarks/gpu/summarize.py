"""Collect the kit's JSON results into one summary.md (machine, every check, the memory table), and the evidence
stage's ns-prune-compare tables (evidence/<scene>-<part>/results.md, and -merged) under the card's name and the
versions, ready to paste into docs/results.md.

    python benchmarks/gpu/summarize.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = " / ".join(line.strip() for line in str(value).splitlines() if line.strip())
    return (text[:297] + "...") if len(text) > 300 else text.replace("|", "\\|")


def _is_result(path: Path) -> bool:
    """A kit script's <name>.json (the run_methods stage also leaves nerfstudio's eval.json and pruning.json)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"script", "environment", "checks"} <= data.keys()


def summarize(folder: Path) -> str:
    files = [path for path in sorted(folder.rglob("*.json")) if _is_result(path)]  # not eval.json and the like
    lines = [f"# GPU kit results ({folder})", ""]
    if not files:
        return "\n".join(lines + ["No results found."]) + "\n"
    env = json.loads(files[0].read_text())["environment"]
    lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for path in files:
        data = json.loads(path.read_text())
        lines += [f"## {data['script']} ({path.relative_to(folder)})", "", "| result | check | numbers |", "|---|---|---|"]
        for check in data["checks"]:
            status = {True: "pass", False: "FAIL", None: "skip"}[check["passed"]]
            numbers = {k: v for k, v in check.items() if k not in ("check", "passed", "traceback")}
            lines.append(f"| {status} | {check['check']} | {', '.join(f'{k}={_cell(v)}' for k, v in numbers.items())} |")
        rows = data.get("measurements", [])
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines + evidence_tables(folder, files)) + "\n"


def evidence_tables(folder: Path, files) -> list:
    """The ns-prune-compare tables of the evidence stage, each under a heading naming the card and the versions."""
    tables = sorted((folder / "evidence").glob("*/results.md"))
    if not tables:
        return []
    env = next((json.loads(p.read_text())["environment"] for p in files if p.name.startswith("evidence_")), {})
    card = env.get("gpu") or f"CPU ({env.get('cpu', '?')}, {env.get('cpu_threads', '?')} threads)"
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "torch_cuda", "gsplat", "python") if env.get(k))
    lines = ["# Evidence: ns-prune-compare on real captures", "",
             f"On {card}; {versions}; commit {env.get('commit', '?')}; {env.get('date', '')}.", ""]
    for table in tables:
        body = table.read_text().split("\n", 1)[-1].strip()  # its own title names the scene's path on the machine
        lines += [f"## {table.parent.name} ({card})", "", body, ""]
    return lines


if __name__ == "__main__":
    out = Path(sys.argv[1])
    text = summarize(out)
    (out / "summary.md").write_text(text)
    print(text)
