"""Collect the kit's JSON results into one summary.md (machine, every check, the memory table).

    python benchmarks/gpu/summarize.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1])
    text = summarize(out)
    (out / "summary.md").write_text(text)
    print(text)
