"""ns-viewer as a user meets it: headless Chromium, driven by selenium, on the short pup-gs and vedal-gs runs of
conftest.py. The page connects and shows a non-blank rgb frame; each plugin output renders a non-blank image that
differs from rgb and nerfstudio's colormap applies to it; vedal-gs's threshold slider shows its range, changes
the count of shown Gaussians and the rgb frame (the checks: nerfstudio_pruning/testing/viewer_browser.py).

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`, done by .ci/run). With
NSP_VIEWER_SCREENSHOTS=<folder> the test also saves the page at each step (analysis/viewer_screenshots.py).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from nerfstudio_pruning.testing.viewer_browser import (CHROMEDRIVER, CHROMIUM, check_pup_gs_page, check_vedal_gs_page,
                                                      chromium, ns_viewer, wait_until_served)

# One pytest-xdist worker runs this module: its module-scoped fixtures are made once.
pytestmark = pytest.mark.xdist_group("viewer-browser")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def viewers(browser, vedal_run, pup_run, e2e_root):
    """ns-viewer on the final checkpoints of both runs, started together so that their start-ups overlap: for each,
    (its URL, the process, its log file)."""
    with ExitStack() as stack:
        started = {name: stack.enter_context(ns_viewer(run / "config.yml", e2e_root))
                   for name, (_, run) in (("vedal", vedal_run), ("pup", pup_run))}
        for url, proc, log in started.values():
            wait_until_served(url, proc, log)
        yield started


def test_vedal_gs_in_the_browser(browser, viewers):
    check_vedal_gs_page(browser, viewers["vedal"])


def test_pup_gs_in_the_browser(browser, viewers):
    check_pup_gs_page(browser, viewers["pup"])
