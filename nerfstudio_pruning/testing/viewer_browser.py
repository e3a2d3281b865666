"""ns-viewer in headless Chromium, driven by selenium: starting the viewer, the page as a user sees it, and the
checks of each method's page. Used by tests/test_viewer_browser.py and analysis/viewer_screenshots.py (which runs
the same checks on other runs to take docs/img/viewer_*.png). Chromium and its driver come from Debian
(`apt-get install chromium chromium-driver`); selenium from the dev extra. With NSP_VIEWER_SCREENSHOTS=<folder>
the page is saved there at each step.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WINDOW = (1000, 760)  # small, so that the page stays light


def screenshot_dir() -> Optional[str]:
    return os.environ.get("NSP_VIEWER_SCREENSHOTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ns_viewer(config: Path, cwd: Path) -> Iterator[tuple]:
    """ns-viewer on `config`, on a free port: yields (its URL, the process, its log file)."""
    port = _free_port()
    # PYTHONFAULTHANDLER: on SIGABRT the process writes every thread's stack to its log (see ViewerPage.viewer_state).
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log = cwd / f"ns-viewer-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "ns-viewer"), "--load-config", str(config),
                                 "--viewer.websocket-port", str(port)], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_served(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    port = int(url.rsplit(":", 1)[1])
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"ns-viewer exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"ns-viewer never served {url}:\n{log.read_text()[-3000:]}")


def chromium():
    """A headless Chromium with software WebGL (no GPU here)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
                 "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


class ViewerPage:
    """The viewer's page as a user sees it: controls found by their visible labels, the frame from screenshots."""

    def __init__(self, driver, viewer: tuple, name: str) -> None:
        from selenium.webdriver.common.by import By

        url, self.viewer_proc, self.viewer_log = viewer
        self.driver, self.name, self.By = driver, name, By
        driver.get(url)
        self.wait_for(lambda: "Connected" in driver.find_element(By.TAG_NAME, "body").text, "the page to connect")
        # The training cameras' thumbnails would cover part of the frame.
        self.click(self.wait_for(lambda: self.find("//button[normalize-space()='Hide Train Cams']"), "the buttons"))
        self.zoom_out(5)

    def zoom_out(self, wheel_steps: int) -> None:
        """Scroll the mouse wheel over the frame: the viewer starts inside the built-in scene's objects."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

        for _ in range(wheel_steps):
            ActionChains(self.driver).scroll_from_origin(ScrollOrigin.from_element(self.canvas()), 0, 200).perform()
            time.sleep(0.1)

    def canvas(self):
        """The viewport's canvas (the page holds a second, full-width one behind the panel)."""
        return min(self.driver.find_elements(self.By.TAG_NAME, "canvas"), key=lambda c: c.rect["width"])

    def find(self, xpath: str):
        found = self.driver.find_elements(self.By.XPATH, xpath)
        return found[0] if found else None

    def click(self, element) -> None:
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def wait_for(self, condition: Callable, what: str, timeout: float = 60.0):
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = condition()
            except StaleElementReferenceException:  # the viewer re-rendered the element between find and read
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: timed out waiting for {what}")

    def control(self, label: str):
        """The input element a visible label names."""
        label_element = self.wait_for(lambda: self.find(f"//label[normalize-space()='{label}']"), f"'{label}'")
        return self.driver.find_element(self.By.ID, label_element.get_attribute("for"))

    def select(self, label: str, option: str) -> None:
        """Choose `option` in the dropdown labelled `label`, as a user does: open it, click the option."""
        self.click(self.control(label))
        self.click(self.wait_for(lambda: self.find(f"//*[@role='option' and normalize-space()='{option}']"),
                                 f"option '{option}' of '{label}'"))
        self.wait_for(lambda: self.control(label).get_attribute("value") == option, f"'{label}' to read '{option}'")

    def options(self, label: str) -> list:
        self.click(self.control(label))
        self.wait_for(lambda: self.find("//*[@role='option']"), f"the options of '{label}'")
        names = [e.get_attribute("textContent").strip()
                 for e in self.driver.find_elements(self.By.XPATH, "//*[@role='option']")]
        self.control(label).send_keys("\ue00c")  # Escape closes the list
        return names

    def frame(self) -> np.ndarray:
        """[H, W, 3] uint8: the rendered frame as displayed (the viewport canvas, without its borders and the
        axes gizmo in its lower left corner)."""
        from PIL import Image

        r = self.canvas().rect
        page = np.asarray(Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB"))
        x0, y0, x1, y1 = int(r["x"]), int(r["y"]), int(r["x"] + r["width"]), int(r["y"] + r["height"])
        return page[y0 + 8:y1 - 90, x0 + 8:x1 - 8]

    def wait_for_frame(self, condition: Callable[[np.ndarray], bool], what: str, timeout: float = 60.0) -> np.ndarray:
        """The displayed frame once `condition` holds for it and it stayed the same for a second (the viewer
        sends a low-resolution frame first, then the full-resolution one)."""
        unchanged_since, previous, changes = time.time(), None, 0
        deadline = time.time() + timeout
        while time.time() < deadline:
            current = self.frame()
            if previous is None or not np.array_equal(current, previous):
                unchanged_since, previous, changes = time.time(), current, changes + 1
            elif time.time() - unchanged_since >= 1.0 and condition(current):
                return current
            time.sleep(0.25)
        last = "none captured" if previous is None else (
            f"{frame_summary(previous)}, kept as {self.keep_frame(previous, what)}")
        raise AssertionError(f"{self.name}: timed out after {timeout:.0f} s waiting for a frame: {what} (the frame "
                             f"changed {changes} times; the last one: {last}); "
                             f"{self.viewer_state()}")

    def viewer_state(self) -> str:
        """Whether ns-viewer still ran, and the end of its log: a render thread that died says why there; one that
        hangs shows where, since a running viewer is aborted here to make it write every thread's stack."""
        code = self.viewer_proc.poll()
        alive = f"ns-viewer had exited {code}" if code is not None else "ns-viewer was running (aborted for its stacks)"
        if code is None:
            self.viewer_proc.send_signal(signal.SIGABRT)
            try:
                self.viewer_proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        log = self.viewer_log.read_text(errors="replace").split("\nExtension modules:")[0]  # faulthandler's module list
        return f"{alive}; its log ends:\n{log[-8000:]}"

    def keep_frame(self, frame: np.ndarray, what: str) -> Path:
        """A frame a check timed out on, as a PNG (in NSP_VIEWER_SCREENSHOTS when set) to look at afterwards."""
        from PIL import Image

        folder = Path(screenshot_dir() or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"viewer_{self.name}_timed_out_{re.sub(r'[^a-z0-9]+', '_', what.lower()).strip('_')}.png"
        Image.fromarray(frame).save(path)
        return path

    def save(self, name: str) -> None:
        """The whole page as <NSP_VIEWER_SCREENSHOTS>/viewer_<name>.png, when that variable is set."""
        folder = screenshot_dir()
        if folder:
            from selenium.webdriver.common.action_chains import ActionChains

            # The pointer rests where the last click left it; a tooltip there would cover the panel.
            ActionChains(self.driver).move_to_element(self.canvas()).perform()
            time.sleep(0.5)
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(Path(folder) / f"viewer_{name}.png"))


def brightness_levels(frame: np.ndarray) -> int:
    """How many distinct brightness levels (R+G+B in steps of 12) a frame shows."""
    return len(np.unique(frame.astype(np.int32).sum(axis=-1) // 12))


def frame_summary(frame: np.ndarray) -> str:
    return (f"frame std {float(frame.std()):.1f}, mean {float(frame.mean()):.1f}, "
            f"{brightness_levels(frame)} brightness levels, shape {frame.shape}")


def not_blank(frame: np.ndarray) -> bool:
    """A picture, not a flat fill: spread-out values and many distinct brightness levels."""
    return float(frame.std()) > 12.0 and brightness_levels(frame) > 20


def differs(a: np.ndarray, b: np.ndarray, by: float = 4.0) -> bool:
    return a.shape == b.shape and float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) > by


def grey(frame: np.ndarray) -> bool:
    """R = G = B up to JPEG's colour rounding."""
    f = frame.astype(np.int16)
    return int(np.abs(f[..., 0] - f[..., 1]).max()) <= 12 and int(np.abs(f[..., 1] - f[..., 2]).max()) <= 12


def shown_count(page: ViewerPage) -> tuple:
    text = page.find("//strong[normalize-space()='Gaussians shown']/..").text
    shown, total = re.match(r"Gaussians shown: ([\d,]+) of ([\d,]+) shown", text).groups()
    return int(shown.replace(",", "")), int(total.replace(",", "")), text


def check_score_output(page: ViewerPage, output: str, rgb: np.ndarray) -> np.ndarray:
    """Select `output`: a picture unlike rgb, in turbo by default and in grey once the Colormap says so."""
    options = page.options("Output type")
    assert output in options, options
    page.select("Output type", output)
    score = page.wait_for_frame(lambda f: not_blank(f) and differs(f, rgb) and not grey(f),
                                f"a non-blank '{output}' frame unlike rgb")
    page.save(f"{page.name}_{output}")
    # A one-channel output: nerfstudio's colormap controls apply to it (for rgb they are disabled).
    colormap = page.control("Colormap")
    assert colormap.is_enabled() and colormap.get_attribute("value") == "turbo"
    page.select("Colormap", "gray")
    page.wait_for_frame(lambda f: grey(f) and not_blank(f), f"'{output}' in the gray colormap")
    page.select("Output type", "rgb")
    page.wait_for_frame(lambda f: not differs(f, rgb), "the rgb frame again")
    return score


def check_vedal_gs_page(driver, viewer: tuple) -> None:
    """vedal-gs's page: a non-blank rgb frame, the retention output, the threshold slider's range, count and frame."""
    started = time.time()
    page = ViewerPage(driver, viewer, "vedal")
    # The first frame of the session may wait for the viewer's first render on a busy machine.
    rgb = page.wait_for_frame(not_blank, "a non-blank rgb frame", timeout=180)
    page.save("vedal_rgb")
    check_score_output(page, "retention", rgb)

    # The threshold slider: its labels show its range; moving it changes the count at once, then the picture.
    slider = page.control("Retention threshold")
    marks = [e.text for e in slider.find_elements(page.By.CSS_SELECTOR, ".mantine-Slider-markLabel")]
    assert marks == ["0.01", "0.5", "0.99"]
    shown, total, text = shown_count(page)
    # The final checkpoint is past the hard removal: at 0.5 every Gaussian is shown, and the text says why.
    assert shown == total and "hard removal" in text, text
    thumb = slider.find_element(page.By.XPATH, ".//*[@role='slider']")
    page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus()", thumb)
    thumb.send_keys("\ue010")  # End: the slider's maximum, 0.99 (a click could land beside the small thumb)
    page.wait_for(lambda: shown_count(page)[0] < total, "the count to drop at threshold 0.99", timeout=10)
    assert thumb.get_attribute("aria-valuenow") == "0.99"
    page.wait_for_frame(lambda f: not_blank(f) and differs(f, rgb, by=2.0), "the rgb frame at threshold 0.99")
    page.save("vedal_rgb_threshold_099")
    print(f"\nvedal-gs page: {time.time() - started:.1f} s; rgb {frame_summary(rgb)}; {shown_count(page)[2]}")


def check_pup_gs_page(driver, viewer: tuple) -> None:
    """pup-gs's page: a non-blank rgb frame and the sensitivity output with its legend."""
    started = time.time()
    page = ViewerPage(driver, viewer, "pup")
    rgb = page.wait_for_frame(not_blank, "a non-blank rgb frame", timeout=180)
    check_score_output(page, "sensitivity", rgb)
    assert page.find("//strong[normalize-space()=\"Output type 'sensitivity'\"]") is not None  # its legend
    print(f"\npup-gs page: {time.time() - started:.1f} s; rgb {frame_summary(rgb)}")
