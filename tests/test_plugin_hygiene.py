"""Importing the plugin does nothing beyond registration, and a broken plugin does not break nerfstudio."""

import subprocess
import sys
import textwrap

BREAK_REGISTRY = textwrap.dedent("""
    import importlib.abc, sys
    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "nerfstudio_pruning.methods.registry":
                raise ImportError("simulated failure in the plugin")
    sys.meta_path.insert(0, Broken())
""")


def _python(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_failing_plugin_import_leaves_splatfacto_usable():
    proc = _python(BREAK_REGISTRY + textwrap.dedent("""
        sys.argv = ["ns-train", "splatfacto", "--help"]
        from nerfstudio.configs.method_configs import all_methods
        assert "splatfacto" in all_methods and "pup-gs" not in all_methods, sorted(all_methods)
        from nerfstudio.scripts.train import entrypoint
        try:
            entrypoint()
        except SystemExit as e:
            assert e.code in (0, None), e.code
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simulated failure in the plugin" in proc.stderr
    assert "--pipeline.model" in proc.stdout


def test_importing_the_plugin_has_no_side_effects():
    proc = _python(textwrap.dedent("""
        import os, sys, torch
        before_cwd = set(os.listdir("."))
        threads = torch.get_num_threads()
        import nerfstudio_pruning.methods.entry_points as ep
        from nerfstudio.plugins.types import MethodSpecification
        assert isinstance(ep.pup_gs, MethodSpecification) and isinstance(ep.vedal_gs, MethodSpecification)
        assert set(os.listdir(".")) == before_cwd, "import wrote files"
        assert torch.get_num_threads() == threads
        assert "open3d" not in sys.modules
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_copied_optimizer_table_still_equals_splatfacto_s():
    """`methods/optimizers.py` copies splatfacto's optimizer table (reading it from the plugin is a circular import):
    the copy must not drift from the nerfstudio version it was taken from."""
    proc = _python(textwrap.dedent("""
        from nerfstudio.configs.method_configs import method_configs
        from nerfstudio_pruning.methods.optimizers import splatfacto_optimizers
        ours = splatfacto_optimizers(30000)
        theirs = method_configs["splatfacto"].optimizers
        assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
        for name, entry in theirs.items():
            # Our Adam config is a subclass that only picks torch's fused kernel on CPU: same settings.
            assert isinstance(ours[name]["optimizer"], type(entry["optimizer"])), name
            assert vars(ours[name]["optimizer"]) == vars(entry["optimizer"]), (name, entry, ours[name])
            assert repr(entry["scheduler"]) == repr(ours[name]["scheduler"]), (name, entry, ours[name])
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cpu_parameters_get_the_fused_adam_and_the_same_update():
    import copy

    import torch

    from nerfstudio_pruning.methods.optimizers import PortableAdamOptimizerConfig

    params = [torch.nn.Parameter(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)))]
    reference = [torch.nn.Parameter(params[0].detach().clone())]
    fused = PortableAdamOptimizerConfig(lr=1e-2, eps=1e-15).setup(params)
    plain = torch.optim.Adam(reference, lr=1e-2, eps=1e-15)
    assert fused.defaults["fused"] is True
    for step in range(5):
        grad = torch.randn(50, 3, generator=torch.Generator().manual_seed(step + 1))
        params[0].grad, reference[0].grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(params[0], reference[0], rtol=1e-6, atol=1e-7)
    # A checkpoint of the unfused optimizer (stock splatfacto) must not switch the fused kernel off.
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))  # a copy: as from a file, no shared moments
    assert plain.state_dict()["param_groups"][0]["fused"] in (None, False)
    assert all(group["fused"] is True for group in fused.param_groups)
    grad = torch.randn(50, 3, generator=torch.Generator().manual_seed(9))
    params[0].grad, reference[0].grad = grad.clone(), grad.clone()
    fused.step()
    plain.step()
    torch.testing.assert_close(params[0], reference[0], rtol=1e-6, atol=1e-7)


def test_splatfacto_viewmats_are_not_torch_compiled_on_cpu():
    """splatfacto's `get_viewmat` runs its own code without torch.compile on CPU tensors (compiling it cost every
    process about 3 s) and still gives gsplat's world-to-camera matrices."""
    import nerfstudio.models.splatfacto as splatfacto_module
    import torch
    import torch._dynamo.utils

    from nerfstudio_pruning.methods.base import get_viewmat

    assert splatfacto_module.get_viewmat is get_viewmat
    gen = torch.Generator().manual_seed(0)
    rotations = torch.linalg.qr(torch.randn(4, 3, 3, generator=gen, dtype=torch.float64))[0]
    camera_to_worlds = torch.cat([rotations, torch.randn(4, 3, 1, generator=gen, dtype=torch.float64)], dim=2)
    frames = torch._dynamo.utils.counters["frames"]["total"]
    viewmats = splatfacto_module.get_viewmat(camera_to_worlds.float())
    assert torch._dynamo.utils.counters["frames"]["total"] == frames, "dynamo traced the call"
    # The inverse of camera-to-world, its camera axes turned from nerfstudio's OpenGL ones to OpenCV's (y, z flipped).
    homogeneous = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    homogeneous[:, :3, :] = camera_to_worlds
    expected = torch.linalg.inv(homogeneous @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(viewmats.double(), expected, rtol=0, atol=1e-5)
