"""docs/img/viewer_*.png: ns-viewer pages in headless Chromium, taken by the browser test's own checks
(nerfstudio_pruning/testing/viewer_browser.py) on the runs given here instead of the test's short ones.

    .venv/bin/python analysis/viewer_screenshots.py --vedal outputs/.../vedal-gs/<run>/config.yml \
        --pup outputs/.../pup-gs/<run>/config.yml [--out docs/img]

Writes viewer_vedal_rgb.png, viewer_vedal_retention.png, viewer_vedal_rgb_threshold_099.png (the slider at its
maximum) and viewer_pup_sensitivity.png, and prints what the test prints.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vedal", type=Path, required=True, help="config.yml of a vedal-gs run")
    parser.add_argument("--pup", type=Path, required=True, help="config.yml of a pup-gs run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    os.environ["NSP_VIEWER_SCREENSHOTS"] = str(args.out.resolve())
    from nerfstudio_pruning.testing import viewer_browser as browser

    if not (browser.CHROMIUM and browser.CHROMEDRIVER):
        raise SystemExit("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    with tempfile.TemporaryDirectory() as logs, ExitStack() as stack:
        started = {name: stack.enter_context(browser.ns_viewer(config.resolve(), Path(logs)))
                   for name, config in (("vedal", args.vedal), ("pup", args.pup))}
        for url, proc, log in started.values():
            browser.wait_until_served(url, proc, log)
        driver = browser.chromium()
        stack.callback(driver.quit)
        browser.check_vedal_gs_page(driver, started["vedal"])
        browser.check_pup_gs_page(driver, started["pup"])
    print(f"\nscreenshots in {args.out}")


if __name__ == "__main__":
    main()
