"""Install hygiene: torchvision imports next to a CPU torch, the fix is inert elsewhere, ns-train lists our methods."""

import subprocess
import sys
import types

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


@pytest.mark.parametrize("method", ["splatfacto-portable", "pup-gs", "vedal-gs"])
def test_ns_train_lists_and_parses_our_methods(method):
    proc = subprocess.run([str(BIN / "ns-train"), method, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "--pipeline.model" in proc.stdout
