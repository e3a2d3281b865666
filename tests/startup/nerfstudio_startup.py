"""Half of every ns-* command's start-up, skipped for the test suite's subprocesses (and its own workers).

nerfstudio 1.1.5 builds a placeholder config for each of the 26 external methods it lists when
`nerfstudio.configs.method_configs` is imported, and each placeholder's `__post_init__` asks `inspect.stack()[2]`
whether `get_external_methods` created it. `inspect.stack()` reads the source context of every frame of the import
chain, and for the frozen importlib frames looks the file up among all loaded modules. Measured on the 2-core VM
(CPU seconds, machine shared): importing method_configs 9.9 -> 6.2, `ns-train pup-gs --help` 13.0 -> 6.7; every
ns-train, ns-eval, ns-export and ns-viewer the tests start (about 50) pays it. Here the same question is asked of the frame itself (`sys._getframe`); a placeholder made
anywhere else still runs nerfstudio's own `__post_init__` (the offer to install the method).

Installed as an import hook that waits for `nerfstudio.configs.external_methods`, so a process that never imports
nerfstudio is untouched; if nerfstudio's module no longer looks as expected, the hook changes nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MODULE = "nerfstudio.configs.external_methods"


def _patch(module) -> None:
    placeholder = getattr(module, "ExternalMethodDummyTrainerConfig", None)
    original = getattr(placeholder, "__post_init__", None)
    if original is None or not callable(getattr(module, "get_external_methods", None)):
        return

    def __post_init__(self) -> None:
        # Frame 0 is this function, 1 the dataclass's __init__, 2 its caller: what nerfstudio's inspect.stack()[2] is.
        if sys._getframe(2).f_code.co_name == "get_external_methods":
            return
        original(self)

    placeholder.__post_init__ = __post_init__


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            try:
                _patch(module)
            except Exception:  # never break nerfstudio's import for a speed-up
                pass

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Arm the hook in this process (a no-op once nerfstudio's module is imported or the hook is armed)."""
    if MODULE in sys.modules:
        return
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
