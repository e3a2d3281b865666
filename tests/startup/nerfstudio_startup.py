"""Half of every ns-* command's start-up, skipped for the test suite's subprocesses (and its own workers).

nerfstudio 1.1.5 builds a placeholder config for each of the 26 external methods it lists when
`nerfstudio.configs.method_configs` is imported, and each placeholder's `__post_init__` asks `inspect.stack()[2]`
whether `get_external_methods` created it. `inspect.stack()` reads the source context of every frame of the import
chain, and for the frozen importlib frames looks the file up among all loaded modules. Measured on the 2-core VM
(CPU seconds, machine shared): importing method_configs 9.9 -> 6.2, `ns-train pup-gs --help` 13.0 -> 6.7; every
ns-train, ns-eval, ns-export and ns-viewer the tests start (about 50) pays it. Here the same question is asked of the frame itself (`sys._getframe`); a placeholder made
anywhere else still runs nerfstudio's own `__post_init__` (the offer to install the method).

The other part: nerfstudio's `torch_compile` (splatfacto's `@torch_compile()` on `get_viewmat`) calls torch.compile
when splatfacto is imported, which imports inductor's compiler (1.3-3 CPU s a process, measured with two training
runs on the same 2 cores). Here the call is deferred to the function's first call, and torch.compile compiles at
that call anyway, so a compiled function behaves as before; the plugin calls the compiled one on CUDA tensors only
(methods/base.py), so a test process on CPU never imports inductor.

Installed as import hooks that wait for `nerfstudio.configs.external_methods` and `nerfstudio.utils.misc`, so a
process that never imports nerfstudio is untouched; if nerfstudio's module no longer looks as expected, the hook
changes nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys

def _patch_external_methods(module) -> None:
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


def _patch_torch_compile(module) -> None:
    original = getattr(module, "torch_compile", None)
    if not callable(original):
        return

    def deferred(fn, args, kwargs):
        compiled = None

        @functools.wraps(fn)
        def call(*call_args, **call_kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = original(*args, **kwargs)(fn)
            return compiled(*call_args, **call_kwargs)

        return call

    def torch_compile(*args, **kwargs):
        if args and callable(args[0]):  # torch_compile(fn_or_module, ...): a module is compiled now, as before
            return deferred(args[0], args[1:], kwargs) if inspect.isfunction(args[0]) else original(*args, **kwargs)
        return lambda fn: deferred(fn, args, kwargs) if inspect.isfunction(fn) else original(*args, **kwargs)(fn)

    module.torch_compile = torch_compile


PATCHES = {
    "nerfstudio.configs.external_methods": _patch_external_methods,
    "nerfstudio.utils.misc": _patch_torch_compile,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.waiting = dict(PATCHES)

    def find_spec(self, name, path=None, target=None):
        patch = self.waiting.pop(name, None)
        if patch is None:
            return None
        if not self.waiting:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            try:
                patch(module)
            except Exception:  # never break nerfstudio's import for a speed-up
                pass

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Arm the hooks in this process (a no-op once nerfstudio's modules are imported or the hooks are armed)."""
    if all(name in sys.modules for name in PATCHES):
        return
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        finder = _PatchOnImport()
        finder.waiting = {name: patch for name, patch in PATCHES.items() if name not in sys.modules}
        sys.meta_path.insert(0, finder)
