"""Loading what nerfstudio's entry points point at, so that an error in this plugin never breaks other commands.

nerfstudio imports every registered plugin when any `ns-*` command starts, and an exception there ends the
command: a bug here would take `ns-train splatfacto` down too. Instead, an import failure becomes one line on
stderr and placeholders that nerfstudio skips (it ignores entry points that are not specifications).
"""

from __future__ import annotations

import importlib
import sys


class Unavailable:
    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def __repr__(self) -> str:
        return f"nerfstudio-pruning's {self.name} (unavailable: {self.reason})"


def guarded_load(module: str, names: tuple) -> dict:
    try:
        loaded = importlib.import_module(module)
        return {name: getattr(loaded, name) for name in names}
    except Exception as err:  # any failure, so that the rest of nerfstudio keeps working
        reason = f"{type(err).__name__}: {err}"
        print(f"nerfstudio-pruning: importing {module} failed ({reason}); its entries are skipped", file=sys.stderr)
        return {name: Unavailable(name, reason) for name in names}
