"""Installing the plugin keeps the machine's torch and its CUDA build (issue 32), checked on the GPU image.

    python benchmarks/gpu/install_check.py fingerprint --out before.json    # run_all.sh: before it installs anything
    python benchmarks/gpu/install_check.py check --before before.json [--out DIR] [--device cuda|cpu]

`check` installs this checkout's wheel (`nerfstudio_pruning-*.whl`, built by fetch_wheels.sh into the carried
wheels) with pip from the carried wheels only (`--no-index --no-deps --target benchmarks/gpu/cache/install-check`:
nothing outside the checkout is written; the machine has no registry, and resolving the plugin's dependencies would
mean resolving nerfstudio's ~45, which the kit does not carry), then checks:

- torch, triton and every nvidia-* distribution are the ones found before run_all.sh installed anything: same
  versions, torch.version.cuda, cuDNN, location, the sha256 of each RECORD and of the (path, size, mtime) of every
  file torch's RECORD lists, so that a reinstall of the same version is caught too;
- `ns-train pup-gs --help` works with the installed plugin (its entry points from the wheel's metadata, not from
  the kit's environment variables; the checkout is not on the path) and lists pup-gs's options;
- the wheel's console script `ns-prune-compare` was written and its entry point loads.

Writes <out>/install.json (summarize.py puts it into summary.md); exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
REPO_ROOT = KIT_DIR.parents[1]
TARGET = KIT_DIR / "cache" / "install-check"

FINGERPRINT = r"""
import hashlib, json, sys
from importlib.metadata import distributions
import torch
out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_file": torch.__file__,
       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None, "records": {}}
for dist in distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name in ("torch", "triton") or name.startswith("nvidia-"):
        record = dist.read_text("RECORD") or ""
        out["records"][name] = {"version": dist.version, "record_sha256": hashlib.sha256(record.encode()).hexdigest(),
                                "location": str(dist.locate_file(""))}
        if name == "torch":
            files = hashlib.sha256()
            count = 0
            for f in dist.files or []:
                path = dist.locate_file(f)
                try:
                    st = path.stat()
                except OSError:
                    continue
                files.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                count += 1
            out["torch_files"] = {"count": count, "stat_sha256": files.hexdigest()}
print(json.dumps(out))
"""


def fingerprint(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", FINGERPRINT], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fingerprinting torch failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_env(**extra: str) -> dict:
    """The environment without the kit's PYTHONPATH (the machine's own packages) and the kit's registrations."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("NERFSTUDIO_")}
    return {**env, **extra}


def differences(before: dict, after: dict) -> list:
    changed = [k for k in ("torch", "torch_cuda", "torch_file", "cudnn", "torch_files") if before.get(k) != after.get(k)]
    for name in sorted(set(before["records"]) | set(after["records"])):
        if before["records"].get(name) != after["records"].get(name):
            changed.append(name)
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("fingerprint", "check"))
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--wheels", type=Path, default=Path(os.environ.get("KIT_WHEELS", KIT_DIR / "wheels")))
    args = parser.parse_args()
    if args.action == "fingerprint":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(fingerprint(bare_env()), indent=1) + "\n")
        print(f"torch fingerprint -> {args.out}")
        return 0

    sys.path.insert(0, str(KIT_DIR))
    import torch
    from kit_common import Results

    out = args.out or KIT_DIR / "results"
    out.mkdir(parents=True, exist_ok=True)
    results = Results("install", args.device or ("cuda" if torch.cuda.is_available() else "cpu"), out)
    before = json.loads(args.before.read_text()) if args.before and args.before.is_file() else None
    if before is None:
        before = fingerprint(bare_env())
        results.skip("fingerprint before the kit installed anything", "no --before file: taken now, after the kit's wheels")
    wheels = sorted(args.wheels.glob("nerfstudio_pruning-*.whl"))
    if not results.check("the plugin's wheel is among the carried wheels", len(wheels) == 1,
                         wheels=[w.name for w in wheels], folder=str(args.wheels)):
        results.write()
        return 1
    import shutil

    shutil.rmtree(TARGET, ignore_errors=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--target", str(TARGET / "site"), str(wheels[0])],
                         capture_output=True, text=True, timeout=300, env=bare_env(PIP_ROOT_USER_ACTION="ignore"))
    results.check("pip installs the plugin's wheel from the carried wheels", pip.returncode == 0,
                  wheel=wheels[0].name, pip=(pip.stdout + pip.stderr)[-800:].strip())
    after = fingerprint(bare_env())
    changed = differences(before, after)
    results.check("torch, its CUDA build, triton and nvidia-* untouched by the kit's installs and the plugin's",
                  not changed, changed=changed, torch=after["torch"], torch_cuda=after["torch_cuda"],
                  cudnn=after["cudnn"], torch_files=after.get("torch_files", {}).get("count"),
                  distributions=len(after["records"]))

    # The installed plugin, the kit's other wheels (nerfstudio --no-deps, gsplat, ...) and the machine's packages;
    # not this checkout. ns_kit.py adds only the shims for what the image lacks.
    site = TARGET / "site"
    kit_site = os.environ.get("KIT_SITE", "")
    env = bare_env(PYTHONPATH=os.pathsep.join(p for p in (str(site), kit_site) if p), NSP_KIT_INSTALLED="1")
    help_run = subprocess.run([sys.executable, str(KIT_DIR / "ns_kit.py"), "train", "pup-gs", "--help"],
                              capture_output=True, text=True, timeout=300, env=env, cwd=TARGET)
    text = help_run.stdout + help_run.stderr
    results.check("ns-train pup-gs --help with the installed plugin", help_run.returncode == 0 and
                  "prune-fractions" in text and "from environment variable" not in text,
                  exit=help_run.returncode, lists_pup_options="prune-fractions" in text,
                  registered_by_env_var="from environment variable" in text, tail=text[-600:].strip())
    probe = subprocess.run([sys.executable, "-c", "import nerfstudio_pruning, sys; from importlib.metadata import "
                            "entry_points as e; print(nerfstudio_pruning.__file__); "
                            "print(sorted(p.name for p in e(group='nerfstudio.method_configs')))"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=TARGET)
    lines = probe.stdout.strip().splitlines()
    results.check("the plugin imports from the installed wheel and registers its methods", probe.returncode == 0
                  and bool(lines) and lines[0].startswith(str(site)) and "pup-gs" in lines[-1],
                  imported_from=lines[0] if lines else probe.stderr[-400:], methods=lines[-1] if lines else None)
    script = site / "bin" / "ns-prune-compare"
    results.check("the wheel's console script ns-prune-compare was written", script.is_file(), path=str(script))
    results.check("torch still untouched after running the installed plugin", not differences(before, fingerprint(bare_env())))
    results.write()
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
