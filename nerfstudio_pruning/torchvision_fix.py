"""Make `import torchvision` work next to a CPU-only torch, and do nothing anywhere else.

The only torchvision wheel on PyPI for torch 2.13 is a CUDA build. With the CPU torch its compiled ops
(`torchvision._C`) cannot load, and torchvision's import then fails on `register_fake("torchvision::nms")`
because that operator was never defined. Defining the two operator schemas (`nms`, `qnms`) before
`torchvision._meta_registrations` runs lets torchvision import; models, transforms and timm work,
`torchvision.ops.nms` itself does not (nothing in nerfstudio's splatfacto path calls it).

`ns-viewer` and friends import torchvision before any plugin is loaded, so the fix is armed at interpreter start
by a one-line `.pth` file (`python -m nerfstudio_pruning.torchvision_fix install`). What it arms is a cheap
import hook: it waits for `torchvision.extension` (which tries to load `_C`) and only if that load failed
defines the schemas. Where torchvision's own ops load (any CUDA install), it changes nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path
from typing import Optional

PTH_NAME = "nerfstudio_pruning_torchvision_fix.pth"
PTH_LINE = (
    "import sys; exec('try:\\n from nerfstudio_pruning.torchvision_fix import install_import_hook\\n"
    " install_import_hook()\\nexcept Exception:\\n pass')\n"
)
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library registration alive for the life of the process
applied = False


def define_missing_schemas() -> bool:
    """Define torchvision's nms/qnms schemas if no kernel library defined them. Returns True if it did."""
    global _library, applied
    import torch

    missing = [name for name in _SCHEMAS if not _schema_exists(name)]
    if not missing:
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])
    applied = True
    return True


def _schema_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


class _AfterExtensionLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        has_ops = getattr(module, "_has_ops", None)
        if has_ops is not None and not has_ops():
            define_missing_schemas()


class _TorchvisionExtensionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "torchvision.extension":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterExtensionLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Arm the fix for this interpreter (idempotent; a no-op once torchvision is imported)."""
    if "torchvision.extension" in sys.modules:
        if not getattr(sys.modules["torchvision.extension"], "_has_ops", lambda: True)():
            define_missing_schemas()
        return
    if not any(isinstance(f, _TorchvisionExtensionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionExtensionFinder())


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: Optional[list] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    if command == "install":
        pth_path().write_text(PTH_LINE)
        print(f"wrote {pth_path()}")
    elif command == "uninstall":
        pth_path().unlink(missing_ok=True)
        print(f"removed {pth_path()}")
    elif command == "status":
        print(f"{pth_path()}: {'present' if pth_path().exists() else 'absent'}")
    else:
        print("usage: python -m nerfstudio_pruning.torchvision_fix [install|uninstall|status]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
