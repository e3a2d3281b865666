"""Run at the start of every Python process the tests start (conftest.py puts this folder on PYTHONPATH): arms
nerfstudio_startup's hook, then runs the sitecustomize this one shadows, if the interpreter has one."""

import importlib.machinery
import importlib.util
import os
import sys

try:
    import nerfstudio_startup

    nerfstudio_startup.install()
except Exception:
    pass

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _shadowed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadowed)
