"""Fixtures shared by the end-to-end tests: the built-in scene and one short splatfacto-portable run."""

from __future__ import annotations

import pytest

from e2e import ns, quick_train_args, run_dir

BASE_STEPS = 300


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def default_scene(e2e_root):
    from nerfstudio_pruning.scene import ensure_default_scene

    return ensure_default_scene(e2e_root / "scene")


@pytest.fixture(scope="session")
def splatfacto_run(e2e_root, default_scene):
    """A splatfacto-portable run on the built-in scene (BASE_STEPS steps), reused by several tests."""
    outputs = e2e_root / "outputs"
    ns("ns-train", ["splatfacto-portable", *quick_train_args("base", BASE_STEPS, outputs),
                    "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root)
    return run_dir(outputs, "base", "splatfacto-portable")
