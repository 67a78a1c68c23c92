"""A viewer panel for scene and part editing: (part words + base prompt -> "Segment parts" -> parts in colour;
part +) edit prompt -> "Run edit" with progress -> before/after toggle -> undo; export the edited scene as .ply.
The part controls show only for methods that segment parts (their actions have ``segment``).

Segmenting and editing take seconds to minutes, so they run in one background worker thread; the viewer stays live
and a status line plus a progress bar follow the work. Each finished job sets the status, which re-renders the view
(nerfstudio's Viewer re-renders after every element callback).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerDropdown,
    ViewerElement,
    ViewerText,
)
from viser import ViserServer

from gsstudio_ext.viewer.folder_panel import FolderPanel

Progress = Callable[[int, int, float], None]
NO_PART = "(segment first)"


@dataclass
class EditActions:
    """What a method does for the panel. ``segment`` and ``edit`` run in the worker thread; the others are short."""

    edit: Callable[[str, str, Progress], str]
    """(part, prompt, progress) -> the name of the 2D edit provider that made the targets (part is "" without
    ``segment``)."""
    undo: Callable[[], bool]
    """Drop the last edit; False when there is none."""
    set_show_edit: Callable[[bool], Any]
    """True: the main view shows the edited scene (after), False the original (before)."""
    export: Callable[[Path], int]
    """Write the (edited) scene as .ply; returns the Gaussian count."""
    segment: Optional[Callable[[Sequence[str], str, Progress], Sequence[str]]] = None
    """(parts, base prompt, progress) -> the part names to offer for editing; None: a method without parts."""
    set_colour_parts: Optional[Callable[[bool], Any]] = None
    """True: the main view shows the part colours over the render."""
    part_names: Optional[Callable[[], Sequence[str]]] = None
    """Parts of the current label field (empty before segmenting)."""


class EditPanel(FolderPanel):
    """Segment / edit / before-after / undo / export controls (see the module docstring)."""

    def __init__(
        self,
        actions: EditActions,
        parts: Sequence[str] = (),
        base_prompt: str = "",
        export_path: str = "exports/edited.ply",
        name: str = "Part editing",
        prompt_hint: str = 'e.g. "gold" or "red striped"',
    ) -> None:
        super().__init__(name, cb_hook=self._on_event)
        self.actions = actions
        self._handlers: Dict[int, Callable[[], None]] = {}
        self._worker: Optional[threading.Thread] = None
        self._progress_bar: Any = None

        def route(element: ViewerElement) -> None:
            self.cb_hook(element)

        def add(element: Any, handler: Optional[Callable[[], None]] = None) -> Any:
            self.elements.append(element)
            if handler is not None:
                self._handlers[id(element)] = handler
            return element

        self.parts: Optional[ViewerText] = None
        self.base_prompt: Optional[ViewerText] = None
        self.colour_parts: Optional[ViewerCheckbox] = None
        self.part: Optional[ViewerDropdown] = None
        if actions.segment is not None:
            self.parts = add(
                ViewerText("Parts", ", ".join(parts), cb_hook=route, hint="Smaller parts first; '+' joins words")
            )
            self.base_prompt = add(ViewerText("Base prompt", base_prompt, cb_hook=route, hint="Describes the object"))
            add(ViewerButton("Segment parts", cb_hook=route), self.start_segment)
            self.colour_parts = add(
                ViewerCheckbox("Colour parts", False, cb_hook=route, hint="Show part colours over the render"),
                self._colour_parts_changed,
            )
            names = list(actions.part_names() if actions.part_names is not None else ()) or [NO_PART]
            self.part = add(ViewerDropdown("Edit part", names[0], names, cb_hook=route, hint="Part to edit"))
        self.prompt = add(ViewerText("Edit prompt", "", cb_hook=route, hint=prompt_hint))
        self.edit_button = add(ViewerButton("Run edit", cb_hook=route), self.start_edit)
        self.show_edit = add(
            ViewerCheckbox("Show edit (after)", True, cb_hook=route, hint="Toggle before / after"),
            lambda: self.actions.set_show_edit(bool(self.show_edit.value)),
        )
        self.undo_button = add(ViewerButton("Undo edit", cb_hook=route), self.undo)
        self.export_path = add(ViewerText("Export path", export_path, cb_hook=route, hint="Where the .ply goes"))
        self.export_button = add(ViewerButton("Export .ply", cb_hook=route), self.export)
        self.status = add(ViewerText("Status", "idle", cb_hook=route, disabled=True))
        self.read_only.append(self.status)

    # ------------------------------------------------------------------ FolderPanel

    def install_extras(self, viser_server: ViserServer) -> None:
        add_bar = getattr(viser_server.gui, "add_progress_bar", None)
        if add_bar is not None:
            self._progress_bar = add_bar(0.0, animated=False)

    def remove(self) -> None:
        if self._progress_bar is not None:
            self._progress_bar.remove()
            self._progress_bar = None
        super().remove()

    def _colour_parts_changed(self) -> None:
        if self.actions.set_colour_parts is not None and self.colour_parts is not None:
            self.actions.set_colour_parts(bool(self.colour_parts.value))

    def _on_event(self, source: Any) -> None:
        handler = self._handlers.get(id(source))
        if handler is not None:
            handler()

    # ------------------------------------------------------------------ work

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _set_status(self, text: str) -> None:
        if self.status.gui_handle is not None:
            self.status.value = text  # its callback re-renders the view
        else:
            self.status.default_value = text

    def _progress(self, label: str) -> Progress:
        last = [-1]

        def report(step: int, total: int, loss: float) -> None:
            percent = int(100 * step / max(total, 1))
            if percent // 5 != last[0] // 5 or step == total:
                last[0] = percent
                if self._progress_bar is not None:
                    self._progress_bar.value = float(min(max(percent, 0), 100))
                self._set_status(f"{label} {step}/{total}")

        return report

    def _run(self, label: str, job: Callable[[], str]) -> None:
        if self.busy:
            self._set_status(f"busy: wait for the current job ({self.status.value})")
            return

        def work() -> None:
            try:
                self._set_status(job())
            except Exception as err:  # noqa: BLE001 - any failure is shown to the user, the viewer stays up
                self._set_status(f"{label} failed: {err}")

        self._worker = threading.Thread(target=work, name=f"edit-panel-{label}", daemon=True)
        self._worker.start()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the current job ends (tests, scripts)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def start_segment(self) -> None:
        segment = self.actions.segment
        if segment is None or self.parts is None or self.base_prompt is None or self.colour_parts is None:
            return
        parts = [p.strip() for p in str(self.parts.value).split(",") if p.strip()]
        base_prompt, colour_parts = str(self.base_prompt.value), self.colour_parts

        def job() -> str:
            names = list(segment(parts, base_prompt, self._progress("segmenting")))
            self._set_part_options(names)
            if self.actions.set_colour_parts is not None:
                self.actions.set_colour_parts(True)
            if colour_parts.gui_handle is not None:
                colour_parts.value = True
            return f"segmented: {', '.join(names)}"

        self._run("segmenting", job)

    def start_edit(self) -> None:
        part, prompt = ("" if self.part is None else str(self.part.value)), str(self.prompt.value).strip()
        if part == NO_PART or not prompt:
            self._set_status("segment the parts and type an edit prompt first" if part else "type an edit prompt first")
            return

        def job() -> str:
            provider = self.actions.edit(part, prompt, self._progress(f"editing {part}".strip()))
            self.actions.set_show_edit(True)
            if self.show_edit.gui_handle is not None:
                self.show_edit.value = True
            return f"edited {part}: {prompt} ({provider})" if part else f"edited: {prompt} ({provider})"

        self._run("editing", job)

    def undo(self) -> None:
        if self.busy:
            return
        self._set_status("undone" if self.actions.undo() else "nothing to undo")

    def export(self) -> None:
        path = Path(str(self.export_path.value))
        try:
            count = self.actions.export(path)
        except Exception as err:  # noqa: BLE001
            self._set_status(f"export failed: {err}")
            return
        self._set_status(f"exported {count} Gaussians to {path}")

    def _set_part_options(self, names: List[str]) -> None:
        if self.part is None:
            return
        names = names or [NO_PART]
        if self.part.gui_handle is not None:
            self.part.set_options(names)
            self.part.value = names[0]
        else:
            self.part.options, self.part.default_value = names, names[0]
