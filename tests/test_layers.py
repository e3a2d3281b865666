"""The layers stay apart: the algorithm code imports neither nerfstudio nor the nerfstudio layer."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import nerfstudio_pruning

ALGORITHM_PACKAGES = ("render", "scoring", "pup", "vedal")
ALGORITHM_MODULES = ("types", "errors", "removal")


def _algorithm_modules():
    root = Path(nerfstudio_pruning.__file__).parent
    names = [f"nerfstudio_pruning.{m}" for m in ALGORITHM_MODULES]
    for package in ALGORITHM_PACKAGES:
        names.append(f"nerfstudio_pruning.{package}")
        names += [f"nerfstudio_pruning.{package}.{info.name}" for info in pkgutil.iter_modules([str(root / package)])]
    return names


def test_algorithm_layers_import_no_nerfstudio():
    modules = _algorithm_modules()
    assert len(modules) >= 15
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'nerfstudio' or m.startswith(('nerfstudio.', 'nerfstudio_pruning.methods', "
        "'nerfstudio_pruning.data', 'nerfstudio_pruning.compare')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"algorithm layers import {result.stdout.strip()} {result.stderr[-2000:]}"
