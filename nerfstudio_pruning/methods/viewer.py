"""What the pruning methods add to ns-viewer: score outputs that cost nothing until they are shown, a threshold
slider whose effect is counted at once, and text that wraps.

Score outputs. nerfstudio's viewer asks the model for every output of a frame (`get_outputs`) and only then picks
the one selected in its "Output type" dropdown; the dropdown lists the keys the model returned. A second render
for a score output would therefore be paid on every frame, also while the user looks at rgb. `ViewerOutputs` is a
`ViewerControl`, which the viewer hands itself to when it starts (`ViewerControl._setup`): through it the model
reads which output the control panel shows (main or split screen) and renders a score output only then. Otherwise
the key is kept in the outputs with a zero image of one channel, so that the dropdown still offers it. Without a
viewer (ns-eval, ns-render, ns-export) there is no score output and no cost.

Score outputs are scalar images [H, W, 1] (see `PortableSplatfactoModel.render_value_image`): nerfstudio's own
Colormap, Invert, Normalize, Min and Max then apply to them, as to depth.

Interrupted frames. The viewer stops a frame in progress when the camera moves by raising `IOChangeException` from a
trace function at the next Python line of its render thread, and drops the frame when that exception reaches it.
When the line is inside torch.compile's tracing (splatfacto's `get_viewmat` is compiled on CUDA tensors, and the
first frame of a process, or one with new guards, compiles it), dynamo rewraps the exception as its own internal
error, the viewer does not recognise it, and its render thread dies: no further frame for that browser tab (seen in the
browser test, 1 page load in 8). `viewer_interrupt` finds the interrupt inside such an error, so that
`PortableSplatfactoModel.get_outputs_for_camera` (the viewer's call) can raise it as the viewer expects.

First frame. The same trace function can land inside any first-time work of the render thread's first frame: on a
CPU, numba loading its cached kernels runs lazy imports and entry-point discovery (`numba.core.entrypoints`), and an
interrupt raised in the middle leaves a module half imported, after which every frame of that process fails
(`AttributeError: module 'numba' has no attribute 'core'`, the vedal-gs browser check under load, 2026-12-08). So
the model renders one small frame from a training camera when the viewer starts (`ViewerOutputs.on_attach`,
`PortableSplatfactoModel.render_first_frame`), on the thread that starts it: numba's kernels, and on CUDA
torch.compile's `get_viewmat`, are then ready before a frame can be interrupted.

The slider. nerfstudio runs an element's callback under the lock its render thread holds for a whole frame, so a
count updated there waits for the frame in progress (seconds, for a full-resolution frame of a large model on a
CPU). `ThresholdSlider` also calls `on_move` directly, from viser's handler thread, before that lock is taken.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement, ViewerSlider
from viser import ViserServer

# Each method's elements sit in their own folder of the control panel; these orders set their sequence there,
# independently of the alphabetical order of attribute names in which nerfstudio installs them.
ORDER_SLIDER, ORDER_COUNT, ORDER_LEGEND = 1.0, 2.0, 3.0


def viewer_interrupt(err: BaseException) -> Optional[BaseException]:
    """The viewer's `IOChangeException` that `err` (raised while rendering) wraps, if any, else None."""
    from nerfstudio.viewer_legacy.server.viewer_utils import IOChangeException  # what the viewer of 1.1.5 raises

    # dynamo chains it as the cause of one error and the context of another, some levels deep: follow both links.
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, IOChangeException):
            return current
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return None


class ViewerOutputs(ViewerControl):
    """Which outputs the viewer shows; `attached` is False outside a viewer. `on_attach(viewer)` runs when the
    viewer starts, on the thread that starts it, before any render thread exists (see "First frame" above)."""

    viewer: Any = None  # set by the viewer when it starts (`ViewerControl._setup`)

    def __init__(self, on_attach: Optional[Callable[[Any], None]] = None) -> None:
        # Underscored: nerfstudio's search for viewer elements (`parse_object`) skips it, not the model behind it.
        self._on_attach = on_attach

    def _setup(self, viewer: Any) -> None:
        super()._setup(viewer)
        if self._on_attach is not None:
            self._on_attach(viewer)

    @property
    def attached(self) -> bool:
        return self.viewer is not None

    def shows(self, name: str) -> bool:
        """True when `name` is on screen: the selected output, or the split screen's second one."""
        if self.viewer is None:
            return False
        panel = self.viewer.control_panel
        return panel.output_render == name or (bool(panel.split) and panel.split_output_render == name)

    def rerender(self) -> None:
        """Ask for a new frame now (nerfstudio interrupts a full-resolution frame in progress)."""
        if self.viewer is not None:
            self.viewer._trigger_rerender()


def add_output_if_shown(outputs: Dict[str, Any], name: str, viewer_outputs: ViewerOutputs,
                        render: Callable[[], torch.Tensor]) -> None:
    """outputs[name] = render() when the viewer shows it; a zero [H, W, 1] image (no render) when a viewer runs
    but shows another output, so that its Output type dropdown lists `name`; nothing without a viewer."""
    if not viewer_outputs.attached:
        return
    if viewer_outputs.shows(name):
        outputs[name] = render()
    else:
        outputs[name] = torch.zeros_like(outputs["rgb"][..., :1])


class ThresholdSlider(ViewerSlider[float]):
    """A slider whose end labels show its range (viser labels a 0.01-0.99 slider "0" at both ends by default)
    and whose `on_move(value)` runs as soon as it moves, without waiting for the frame being rendered."""

    def __init__(self, name: str, default_value: float, min_value: float, max_value: float, step: float,
                 on_move: Callable[[float], None], marks: Sequence[float], hint: str) -> None:
        super().__init__(name, default_value, min_value, max_value, step, hint=hint)
        self.on_move = on_move
        self.marks: Tuple[Tuple[float, str], ...] = tuple((m, f"{m:g}") for m in marks)

    def _create_gui_handle(self, viser_server: ViserServer) -> None:
        assert self.gui_handle is None, "gui_handle should be initialized once"
        self.gui_handle = viser_server.gui.add_slider(
            self.name, self.min, self.max, self.step, self.default_value, marks=self.marks,
            disabled=self.disabled, visible=self.visible, hint=self.hint, order=ORDER_SLIDER,
        )
        # Registered before `install` adds nerfstudio's callback (which waits for the render lock): viser calls a
        # handle's callbacks in the order they were added.
        handle = self.gui_handle
        handle.on_update(lambda _: self.on_move(float(handle.value)))


class ViewerMarkdown(ViewerElement[str]):
    """Read-only text that wraps: viser markdown. (A `ViewerText` is a one-line input box that cuts long text, and
    assigning its value triggers a re-render.)"""

    def __init__(self, name: str, content: str, order: float) -> None:
        super().__init__(name)
        self._content = content
        self.order = order

    @property
    def content(self) -> str:
        return self._content

    @content.setter
    def content(self, content: str) -> None:
        self._content = content
        if self.gui_handle is not None:
            self.gui_handle.content = content

    def _create_gui_handle(self, viser_server: ViserServer) -> None:
        self.gui_handle = viser_server.gui.add_markdown(self._content, order=self.order)

    def install(self, viser_server: ViserServer) -> None:
        self._create_gui_handle(viser_server)


def score_legend(output: str, what: str, low: str, high: str) -> str:
    """Markdown naming both ends of a score output in nerfstudio's default colormap (turbo)."""
    return "  \n".join([
        f"**Output type '{output}'**: {what}.",
        f"Blue end (0): {low}; red end (1): {high}.",
        "Empty pixels read 0. Untick Normalize for absolute values.",
    ])
