"""Stand-ins for packages nerfstudio imports at module level but the GPU kit never uses (see README.md here).

`missing_module_getattr(name, why)` gives a module `__getattr__`: every attribute is a `Missing` placeholder that
can be looked into (`open3d.t.geometry.PointCloud`) and passed around (a default argument), but raises as soon as
it is called, so that a feature needing the real package fails loudly with the reason, never silently.
"""

from __future__ import annotations


class Missing:
    def __init__(self, path: str, why: str) -> None:
        self._path, self._why = path, why

    def __getattr__(self, name: str) -> "Missing":
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{self._path}.{name}", self._why)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._path} is not available: {self._path.split('.')[0]} is a GPU-kit shim "
                           f"(benchmarks/gpu/shims), not the real package; {self._why}")

    def __mro_entries__(self, bases):  # `class Handle(viser.GuiInputHandle)`: a plain class stands in
        return (type(self._path.rsplit(".", 1)[-1], (), {"__doc__": repr(self)}),)

    def __repr__(self) -> str:
        return f"<GPU-kit shim placeholder {self._path}>"


def missing_module_getattr(name: str, why: str):
    def __getattr__(attr: str) -> Missing:
        if attr.startswith("__"):
            raise AttributeError(f"module {name!r} (GPU-kit shim) has no attribute {attr!r}")
        return Missing(f"{name}.{attr}", why)

    return __getattr__
