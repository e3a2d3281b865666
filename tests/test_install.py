"""Install hygiene: torchvision imports next to a CPU torch, the fix is inert elsewhere, ns-train lists our methods."""

import os
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from e2e import BIN
from nerfstudio_pruning import torchvision_fix


def test_torchvision_imports_in_a_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-c", "import torchvision, timm; print(torchvision.__version__)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fix_does_nothing_where_torchvision_ops_load(monkeypatch):
    calls = []
    monkeypatch.setattr(torchvision_fix, "define_missing_schemas", lambda: calls.append(1))
    loaded = types.SimpleNamespace(_has_ops=lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision.extension", loaded)
    torchvision_fix.install_import_hook()
    assert calls == []
    broken = types.SimpleNamespace(_has_ops=lambda: False)
    monkeypatch.setitem(sys.modules, "torchvision.extension", broken)
    torchvision_fix.install_import_hook()
    assert calls == [1]


def test_schemas_are_not_redefined_when_present():
    # In this process torchvision is already imported: its schemas exist (ours or its own), nothing to define.
    import torchvision  # noqa: F401

    assert torchvision_fix.define_missing_schemas() is False


METHODS = ("splatfacto-portable", "pup-gs", "vedal-gs")
# `ns-train METHOD --help` for each method in one interpreter (each ns-train start costs ~7 s of imports): the
# function the ns-train script calls, with the argv it would get, each help framed by markers.
HELP_EACH = """
import sys
from nerfstudio.scripts.train import entrypoint
for method in sys.argv[1:]:
    sys.argv = ["ns-train", method, "--help"]
    print(f"<<< {method}", flush=True)
    try:
        entrypoint()
    except SystemExit as stop:
        print(f">>> {method} exit {stop.code}", flush=True)
"""


def test_ns_train_lists_and_parses_our_methods():
    script = (BIN / "ns-train").read_text()
    assert "from nerfstudio.scripts.train import entrypoint" in script  # what HELP_EACH calls
    proc = subprocess.run([sys.executable, "-c", HELP_EACH, *METHODS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for method in METHODS:
        help_text = proc.stdout.split(f"<<< {method}\n", 1)[1].split(f">>> {method} exit", 1)
        assert help_text[1].startswith(" 0\n"), (method, help_text[0][-2000:], proc.stderr[-2000:])
        assert "--pipeline.model" in help_text[0], method


# -- installing into an existing nerfstudio environment (README: "Installing into your nerfstudio environment") --------
REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the checkout must not shadow what the environment has installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc


def _user_environment(root: Path) -> Path:
    """A fresh venv that already holds nerfstudio 1.1.5 and a torch, as a nerfstudio user's does, without copying
    gigabytes: this venv's packages, minus this plugin, seen through a folder of links that a .pth file names.
    (Paths named by a .pth file are outside the venv for pip: it would never uninstall or change them.)"""
    shared = Path(sysconfig.get_paths()["purelib"])
    links = root / "user-packages"
    links.mkdir()
    for entry in shared.iterdir():
        name = entry.name
        if name.startswith(("nerfstudio_pruning", "__editable__")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (links / name).symlink_to(entry)
    env = root / "user-env"
    _run([sys.executable, "-m", "venv", "--without-pip", env], cwd=root)
    python = env / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    (purelib / "user-packages.pth").write_text(f"{links}\n")
    return python


TORCH_FACTS = ("import json, torch, importlib.metadata as m; print(json.dumps({'version': torch.__version__, "
               "'cuda': torch.version.cuda, 'file': torch.__file__, 'dist': str(m.distribution('torch')._path)}))")


def test_the_wheel_installs_into_a_nerfstudio_environment_keeping_its_torch(tmp_path):
    import json

    import torch

    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "nerfstudio_pruning", source / "nerfstudio_pruning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          tmp_path / "dist", source], cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("nerfstudio_pruning-*.whl")

    python = _user_environment(tmp_path)
    before = json.loads(_run([python, "-c", TORCH_FACTS], cwd=tmp_path).stdout)
    torch_dir = Path(torch.__file__).parent
    stamps = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in torch_dir.glob("*.py")}
    assert stamps and before["version"] == torch.__version__

    # The README's line, with the wheel for "." and --no-index: every dependency must already be there.
    _run([python, "-m", "pip", "install", "--no-index", wheel, f"torch=={before['version']}"], cwd=tmp_path)

    after = json.loads(_run([python, "-c", TORCH_FACTS], cwd=tmp_path).stdout)
    assert after == before
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in torch_dir.glob("*.py")} == stamps
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    assert not [p.name for p in purelib.iterdir() if p.name.lower().startswith("torch")]
    where = _run([python, "-c", "import nerfstudio_pruning; print(nerfstudio_pruning.__file__)"], cwd=tmp_path).stdout
    assert where.strip().startswith(str(purelib))

    # On a CPU-only torch, torchvision (a CUDA build on PyPI) needs the plugin's import fix; elsewhere it is inert.
    _run([python, "-m", "nerfstudio_pruning.torchvision_fix", "install"], cwd=tmp_path)
    # What the ns-train script runs; this venv has no script of its own (nerfstudio is seen, not installed, here).
    help_text = _run([python, "-c", "import sys; from nerfstudio.scripts.train import entrypoint; "
                      "sys.argv = ['ns-train', 'pup-gs', '--help']; entrypoint()"], cwd=tmp_path).stdout
    assert "--pipeline.model.init-ply" in help_text and "--pipeline.model.prune-fractions" in help_text
