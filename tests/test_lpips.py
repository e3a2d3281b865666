"""LPIPS without a network: computed where AlexNet's weights are in the torch hub cache, otherwise omitted with one
line and no download attempt."""

from __future__ import annotations

import os
import subprocess
import sys

# Two models' metrics in one process, as ns-prune-compare evaluates its runs.
TWO_MODELS = """
import torch
from nerfstudio_pruning.methods.base import LazyLPIPS
a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
print("values", [float(LazyLPIPS()(a, b)) for _ in range(2)])
"""


def test_lpips_without_weights_is_omitted_in_one_line_and_never_downloaded(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))  # an empty hub cache
    proc = subprocess.run([sys.executable, "-c", TWO_MODELS], env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert text.count("LPIPS omitted") == 1 and "Downloading" not in text, text
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in text  # says where the weights would have to be
    assert "values [nan, nan]" in text
    assert not (tmp_path / "torch").exists()  # nothing fetched, nothing written


def test_lpips_weights_are_looked_up_in_the_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import AlexNet_Weights

    from nerfstudio_pruning.methods.base import lpips_unavailable_reason

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lpips_unavailable_reason.cache_clear()
    try:
        assert str(tmp_path / "hub" / "checkpoints") in lpips_unavailable_reason()
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        (tmp_path / "hub" / "checkpoints" / AlexNet_Weights.DEFAULT.url.rsplit("/", 1)[1]).write_bytes(b"")
        lpips_unavailable_reason.cache_clear()
        assert lpips_unavailable_reason() is None
    finally:
        lpips_unavailable_reason.cache_clear()
