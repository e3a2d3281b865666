"""Run nerfstudio's `ns-train`, `ns-eval` or `ns-export` the way the GPU kit needs them, in this process:

    python benchmarks/gpu/ns_kit.py train pup-gs --max-num-iterations 30 ... nsp-default-scene --data DIR
    python benchmarks/gpu/ns_kit.py eval --load-config .../config.yml --output-path eval.json
    python benchmarks/gpu/ns_kit.py export gaussian-splat --load-config .../config.yml --output-dir DIR

On the GPU machine this checkout is not pip-installed, so nerfstudio cannot find the plugin's entry points; they
are read from pyproject.toml and handed to nerfstudio through its documented environment variables
(NERFSTUDIO_METHOD_CONFIGS, NERFSTUDIO_DATAPARSER_CONFIGS) unless an installed copy already provides them. With
CUDA, gsplat's extension is first loaded the kit's way (kit_common.load_gsplat_cuda: the carried build in
benchmarks/gpu/cache/gsplat_cuda when it matches, else gsplat's own JIT build), so each command does not rebuild
it. Without numba the CPU rasterizer is the torch one (kit_common sets NSP_CPU_RASTERIZER=torch).

    python benchmarks/gpu/ns_kit.py imports      # import the plugin, both methods, ns-train/eval/export: [PASS]/[FAIL]
    python benchmarks/gpu/ns_kit.py compare --scene DIR ...   # ns-prune-compare, its runs through this launcher

`compare` runs the plugin's `ns-prune-compare` console script (from the installed package's metadata, else from
this checkout's pyproject.toml) as a user would; it starts `ns-train` from the folder of `sys.executable`, which
on the GPU machine has none, so that folder becomes benchmarks/gpu/cache/kit-bin: `ns-train`, `ns-eval`,
`ns-export` that run through this launcher, and `python`, the running interpreter (shell scripts that exec it).

This launcher appends benchmarks/gpu/shims (stand-ins for packages nerfstudio imports at module level but the kit
never uses, see shims/README.md) to sys.path, after the real packages; run_all.sh puts the installed wheels on
PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points, version
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
REPO_ROOT = KIT_DIR.parents[1]
sys.path.insert(0, str(KIT_DIR))

SHIMS = KIT_DIR / "shims"
COMMANDS = {"train": "nerfstudio.scripts.train", "eval": "nerfstudio.scripts.eval",
            "export": "nerfstudio.scripts.exporter", "compare": "ns-prune-compare"}
KIT_BIN = KIT_DIR / "cache" / "kit-bin"
GROUPS = {"nerfstudio.method_configs": "NERFSTUDIO_METHOD_CONFIGS",
          "nerfstudio.dataparser_configs": "NERFSTUDIO_DATAPARSER_CONFIGS"}


def plugin_entry_points() -> dict:
    """{group: {name: "module:attr"}} of this checkout's pyproject.toml (and its console scripts as "scripts")."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the same table, read by hand
        return _entry_points_by_hand((REPO_ROOT / "pyproject.toml").read_text())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return {**{group: dict(project.get("entry-points", {}).get(group, {})) for group in GROUPS},
            "scripts": dict(project.get("scripts", {}))}


def _entry_points_by_hand(text: str) -> dict:
    out: dict = {group: {} for group in (*GROUPS, "scripts")}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = next((g for g in GROUPS if line == f'[project.entry-points."{g}"]'), None)
            current = "scripts" if line == "[project.scripts]" else current
        elif current and "=" in line:
            name, value = (part.strip().strip('"') for part in line.split("=", 1))
            out[current][name] = value
    return out


def register_plugin() -> None:
    for group, variable in GROUPS.items():
        installed = set(entry_points(group=group).names)
        wanted = {name: target for name, target in plugin_entry_points()[group].items() if name not in installed}
        if wanted and variable not in os.environ:
            os.environ[variable] = ",".join(f"{name}={target}" for name, target in wanted.items())


def console_script(name: str):
    """The function of the plugin's console script `name`: from the installed package's metadata when the plugin
    is installed (NSP_KIT_INSTALLED=1, the install check), else from this checkout's pyproject.toml."""
    import importlib

    if os.environ.get("NSP_KIT_INSTALLED") == "1":
        found = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
        if not found:
            sys.exit(f"error: no installed console script {name}")
        return found[0].load()
    module, _, attr = plugin_entry_points()["scripts"][name].partition(":")
    return getattr(importlib.import_module(module), attr)


def make_kit_bin() -> Path:
    """benchmarks/gpu/cache/kit-bin: `python` (this interpreter) and ns-train, ns-eval, ns-export through this
    launcher, as shell scripts that exec the interpreter (a symlink elsewhere would lose its virtual environment)."""
    KIT_BIN.mkdir(parents=True, exist_ok=True)
    for name, command in (("python", None), ("ns-train", "train"), ("ns-eval", "eval"), ("ns-export", "export")):
        launcher = f' "{Path(__file__).resolve()}" {command}' if command else ""
        path = KIT_BIN / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}"{launcher} "$@"\n')
        path.chmod(0o755)
    return KIT_BIN


def use_shims() -> None:
    """Put the shims (shims/README.md) at the end of sys.path: a real package, where installed, still wins.

    torchmetrics probes for optional packages when it is imported (matplotlib and scipy with find_spec and an
    import, torchvision through lightning_utilities): it is imported first, so that it sees them absent and never
    imports the stand-ins. The GPU machine's python never sees the shims outside this launcher."""
    import torchmetrics  # noqa: F401

    if str(SHIMS) not in sys.path:
        sys.path.append(str(SHIMS))


CHECKED_IMPORTS = ("nerfstudio_pruning.methods.pup_gs", "nerfstudio_pruning.methods.vedal_gs",
                   "nerfstudio_pruning.methods.trainer", "nerfstudio_pruning.methods.registry",
                   "nerfstudio.scripts.train", "nerfstudio.scripts.eval", "nerfstudio.scripts.exporter")


def check_imports() -> int:
    """`ns_kit.py imports`: import what the kit's commands import, and the method configs nerfstudio registers."""
    import importlib
    import traceback

    import nerfstudio

    print(f"nerfstudio {version('nerfstudio')} from {Path(nerfstudio.__file__).parent}")
    failed = 0
    for name in CHECKED_IMPORTS:
        try:
            importlib.import_module(name)
            print(f"[PASS] import {name}")
        except Exception as err:  # noqa: BLE001
            failed += 1
            print(f"[FAIL] import {name}: {type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}")
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.configs.dataparser_configs import all_dataparsers

    for method in ("splatfacto-portable", "pup-gs", "vedal-gs"):
        ok = method in all_methods and type(all_methods[method].pipeline.model).__module__.startswith("nerfstudio_pruning")
        failed += not ok
        print(f"[{'PASS' if ok else 'FAIL'}] method config {method}: "
              f"{type(all_methods[method].pipeline.model).__name__ if method in all_methods else 'not registered'}")
    ok = "nsp-default-scene" in all_dataparsers
    failed += not ok
    print(f"[{'PASS' if ok else 'FAIL'}] dataparser nsp-default-scene")
    return 1 if failed else 0


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*COMMANDS, "imports"):
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(COMMANDS)},imports}} ARGS...")
    command, args = sys.argv[1], sys.argv[2:]
    register_plugin()
    import kit_common  # noqa: F401 - picks the CPU rasterizer when numba is absent
    import torch

    use_shims()
    if command == "imports":
        sys.exit(check_imports())
    if torch.cuda.is_available() and not {"--help", "-h"} & set(args):  # --help renders nothing: no build
        print(f"gsplat CUDA extension: {kit_common.load_gsplat_cuda()}", flush=True)
    if command == "compare":
        entrypoint = console_script(COMMANDS[command])
        sys.executable = str(make_kit_bin() / "python")  # ns-prune-compare starts <its folder>/ns-train
        sys.argv = [COMMANDS[command], *args]
    else:
        entrypoint = __import__(COMMANDS[command], fromlist=["entrypoint"]).entrypoint
        sys.argv = [f"ns-{command}", *args]
    entrypoint()


if __name__ == "__main__":
    main()
