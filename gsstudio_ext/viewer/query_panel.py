"""A viewer panel for selecting Gaussians: text query (negatives, threshold), display mode, click-to-select with a
marker in the 3D scene, undo, clear and export.

The panel is a :class:`~gsstudio_ext.viewer.folder_panel.FolderPanel` of nerfstudio's own elements (ViewerText,
ViewerSlider, ViewerDropdown, ViewerCheckbox, ViewerButton), in a fixed order. It knows nothing about the
model: a method hands it :class:`PanelActions` (callbacks); a control appears only when its action is given.

Attach it to the model (any ``nn.Module`` the pipeline holds) together with a ``ViewerControl``::

    self.viewer_control = ViewerControl()          # nerfstudio sets it up: clicks, scene markers, run dir
    self.query_panel = QueryPanel(actions, self.viewer_control)

nerfstudio's Viewer finds both by scanning the pipeline. It wraps the panel's ``cb_hook`` so that every panel
event (a control's update, a click in the scene) runs under the training lock and is followed by a re-render;
the panel routes all its events through that hook, so actions stay short and never take the lock themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerClick,
    ViewerControl,
    ViewerDropdown,
    ViewerElement,
    ViewerSlider,
    ViewerText,
)
from torch import Tensor

from gsstudio_ext.viewer.folder_panel import FolderPanel
from gsstudio_ext.viewer.ray_camera import ray_camera

MODES = ["highlight", "isolate", "remove"]


def viser_scale() -> float:
    """nerfstudio draws its world in viser scaled by this (imported lazily: the viewer module is heavy)."""
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    return float(VISER_NERFSTUDIO_SCALE_RATIO)


@dataclass
class PanelActions:
    """What a method does for the panel. Each action runs under the viewer's training lock: keep it short. Errors
    meant for the user are ValueError / RuntimeError / OSError; the panel shows their message."""

    text_query: Optional[Callable[[str, Tuple[str, ...], float], Any]] = None
    """Select what matches (text, negatives, threshold); shows the text box, negatives and threshold slider."""
    clear: Optional[Callable[[], Any]] = None
    """Drop the selection (undoable); also run when the text box is emptied."""
    set_mode: Optional[Callable[[str], Any]] = None
    """Show the selection as "highlight", "isolate" or "remove"; shows the mode dropdown."""
    click: Optional[Callable[[Cameras, int, int, bool], Optional[Tensor]]] = None
    """Select what pixel (x, y) of a one-camera ``Cameras`` shows (added to the selection when the flag is True);
    return the world point hit [3], or None (and change nothing) when the pixel shows nothing."""
    undo: Optional[Callable[[], bool]] = None
    """Restore the previous selection; False when there is none."""
    export: Optional[Callable[[Path], int]] = None
    """Write the selection to a .ply at the given path; returns the number of Gaussians written."""
    selection_size: Optional[Callable[[], int]] = None
    """Number of selected Gaussians, shown in the status line."""


@dataclass
class _Step:
    """One selection change made from the panel, with the markers it placed or hid (undone together)."""

    added: Any = None
    hidden: List[Any] = field(default_factory=list)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "panel"


def split_phrases(text: str) -> Tuple[str, ...]:
    """Comma-separated phrases, stripped, empty ones dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


class QueryPanel(FolderPanel):
    """Selection controls in a viewer folder (see the module docstring for how a model attaches it).

    Args:
        actions: what the method does for each control.
        control: a ``ViewerControl`` that the model also exposes as an attribute (nerfstudio sets it up); needed
            for click-to-select, markers and the default export folder. None: no click-to-select.
        name: folder label.
        text: initial content of the text box (shown only; the method applies its own start-up query).
        negatives: initial negatives (comma-separated).
        threshold: initial threshold of the text query.
        mode: initial display mode.
        export_dir: where exports go; None = ``<run dir>/exports`` (the run dir of the viewer's log file).
        marker_color: RGB 0-255 of the click markers.
        marker_scale: marker radius as a fraction of the distance from the camera to the clicked point.
    """

    def __init__(
        self,
        actions: PanelActions,
        control: Optional[ViewerControl] = None,
        name: str = "Query",
        text: str = "",
        negatives: str = "",
        threshold: float = 0.5,
        mode: str = "highlight",
        export_dir: Optional[Path] = None,
        marker_color: Tuple[int, int, int] = (255, 40, 200),
        marker_scale: float = 0.02,
    ) -> None:
        super().__init__(name, cb_hook=self._on_event)
        self.actions = actions
        self.control = control
        self.export_dir = export_dir
        self.marker_color = marker_color
        self.marker_scale = marker_scale
        self.markers: List[Any] = []
        """Live marker handles (viser scene nodes), oldest first."""
        self.exported: List[Path] = []
        """Files written by the export button."""
        self._steps: List[_Step] = []
        self._last_query: Optional[Tuple[str, Tuple[str, ...], float]] = None
        self._handlers: Dict[int, Callable[[], None]] = {}

        def route(element: ViewerElement) -> None:
            self.cb_hook(element)  # looked up at call time: the Viewer's wrapper (lock + re-render) once installed

        a = actions
        if a.text_query is not None:
            self.text = self._add(ViewerText("Text", text, cb_hook=route, hint="What to select"), self.run_query)
            self.negatives = self._add(
                ViewerText("Negatives", negatives, cb_hook=route, hint="Comma-separated phrases to avoid"),
                self.run_query,
            )
            self.threshold = self._add(
                ViewerSlider("Threshold", float(threshold), 0.0, 1.0, 0.01, cb_hook=route,
                             hint="Minimum similarity of the best match"),
                self.run_query,
            )  # fmt: skip
        if a.set_mode is not None:
            self.mode = self._add(
                ViewerDropdown("Mode", mode, list(MODES), cb_hook=route, hint="How the selection shows"),
                self.apply_mode,
            )
        if a.click is not None and control is not None:
            self.click_button = self._add(ViewerButton("Select by click", cb_hook=route), self.arm_click)
            self.add_to_selection = self._add(
                ViewerCheckbox("Add to selection", False, hint="A click adds to the selection instead of replacing it"),
                None,
            )
        if a.undo is not None:
            self.undo_button = self._add(ViewerButton("Undo", cb_hook=route), self.undo)
        if a.clear is not None:
            self.clear_button = self._add(ViewerButton("Clear", cb_hook=route), self.clear)
        if a.export is not None:
            self.export_button = self._add(ViewerButton("Export selection", cb_hook=route), self.export)
        self.status = self._add(ViewerText("Status", "", disabled=True), None)
        self.read_only.append(self.status)

    def _add(self, element: Any, handler: Optional[Callable[[], Any]]) -> Any:
        self.elements.append(element)
        if handler is not None:
            self._handlers[id(element)] = handler
        return element

    # ------------------------------------------------------------------ ViewerElement

    def remove(self) -> None:
        """Remove the controls and the markers."""
        super().remove()
        for marker in self.markers:
            marker.remove()
        self.markers.clear()

    def _on_event(self, source: Any) -> None:
        """Every panel event lands here (under the viewer's lock once installed)."""
        try:
            if isinstance(source, ViewerClick):
                self.select_at(source)
            elif id(source) in self._handlers:
                self._handlers[id(source)]()
        except (ValueError, RuntimeError, OSError) as error:
            self._show(f"error: {error}")

    # ------------------------------------------------------------------ actions (public: tests and scripts call them)

    def run_query(self) -> None:
        """Run the text query with the current text, negatives and threshold (empty text clears)."""
        text = self.text.value.strip()
        query = (text, split_phrases(self.negatives.value), float(self.threshold.value))
        if query == self._last_query:
            return
        if not text:
            if self.actions.clear is not None:
                self.clear()
        else:
            self.actions.text_query(*query)  # type: ignore[misc]
            self._steps.append(_Step(hidden=self._hide_markers()))
            self._show(f'"{text}"')
        self._last_query = query

    def apply_mode(self) -> None:
        self.actions.set_mode(self.mode.value)  # type: ignore[misc]
        self._show(f"mode: {self.mode.value}")

    def arm_click(self) -> None:
        """Wait for one click in the 3D view (the next click selects instead of moving the camera)."""
        if self.control is None or getattr(self.control, "viser_server", None) is None:
            raise RuntimeError("click-to-select needs the model to expose the panel's ViewerControl as an attribute")
        self.control.register_pointer_cb("click", self._on_pointer)
        self._show("click an object in the view")

    def _on_pointer(self, click: ViewerClick) -> None:
        assert self.control is not None
        self.control.unregister_pointer_cb()  # one selection per press
        self.cb_hook(click)

    def select_at(self, click: ViewerClick) -> None:
        """Select what the click's ray hits; a marker shows the 3D point."""
        camera, x, y = ray_camera(click.origin, click.direction)
        add = bool(self.add_to_selection.value)
        point = self.actions.click(camera, x, y, add)  # type: ignore[misc]
        if point is None:
            self._show("nothing under the click")
            return
        self._last_query = None
        hidden = [] if add else self._hide_markers()
        self._steps.append(_Step(added=self._place_marker(click, point), hidden=hidden))
        self._show("selected by click")

    def undo(self) -> None:
        """Undo the last selection change (its marker goes, markers it hid come back)."""
        if not self.actions.undo():  # type: ignore[misc]
            self._show("nothing to undo")
            return
        self._last_query = None
        if self._steps:
            step = self._steps.pop()
            if step.added is not None:
                step.added.remove()
                self.markers.remove(step.added)
            for marker in step.hidden:
                marker.visible = True
        self._show("undone")

    def clear(self) -> None:
        """Drop the selection (undoable) and hide the markers."""
        self.actions.clear()  # type: ignore[misc]
        self._last_query = None
        self._steps.append(_Step(hidden=self._hide_markers()))
        self._show("cleared")

    def export(self) -> Path:
        """Write the selection to ``<export dir>/selection_<n>.ply`` (next free n)."""
        folder = self.export_dir or self._run_dir() / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        index = 0
        while (folder / f"selection_{index}.ply").exists():
            index += 1
        path = folder / f"selection_{index}.ply"
        count = self.actions.export(path)  # type: ignore[misc]
        self.exported.append(path)
        self._show(f"wrote {count} Gaussians to {path.name}")
        return path

    # ------------------------------------------------------------------ helpers

    def _run_dir(self) -> Path:
        viewer = getattr(self.control, "viewer", None)
        if viewer is None:
            raise RuntimeError("no export folder: pass export_dir, or expose the panel's ViewerControl on the model")
        return Path(viewer.log_filename).parent

    def _hide_markers(self) -> List[Any]:
        shown = [marker for marker in self.markers if marker.visible]
        for marker in shown:
            marker.visible = False
        return shown

    def _place_marker(self, click: ViewerClick, point: Tensor) -> Any:
        server = getattr(self.control, "viser_server", None)
        if server is None:
            return None
        position = point.detach().float().cpu()
        scale = viser_scale()
        distance = float((position - position.new_tensor(click.origin)).norm())
        handle = server.scene.add_icosphere(
            f"/{_slug(self.name)}_clicks/{len(self._steps)}_{len(self.markers)}",
            radius=max(distance * self.marker_scale, 1e-4) * scale,
            color=self.marker_color,
            position=tuple(float(v) * scale for v in position),
        )
        self.markers.append(handle)
        return handle

    def _show(self, message: str) -> None:
        size = self.actions.selection_size
        count = f"{size()} selected" if size is not None else ""
        self.status.value = " | ".join(part for part in (count, message) if part)

    @property
    def marker_positions(self) -> Sequence[Tuple[float, float, float]]:
        """World positions (nerfstudio scale) of the visible markers."""
        scale = viser_scale()
        return [tuple(float(v) / scale for v in m.position) for m in self.markers if m.visible]
