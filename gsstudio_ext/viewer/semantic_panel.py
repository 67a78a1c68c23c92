"""A viewer panel for semantic segmentation: which scene to show, colour-by-class on the main view, a class filter,
and a colour legend of the class list.

A :class:`~gsstudio_ext.viewer.folder_panel.FolderPanel`: the model attaches it as an attribute and nerfstudio's
Viewer wraps its ``cb_hook`` (training lock + re-render). The legend is a Markdown image drawn once from the palette.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
from nerfstudio.viewer.viewer_elements import ViewerCheckbox, ViewerDropdown, ViewerElement
from PIL import Image, ImageDraw
from viser import ViserServer

from gsstudio_ext.viewer.folder_panel import FolderPanel

ALL_CLASSES = "all classes"


@dataclass
class SemanticActions:
    """What a method does for the panel (each runs under the viewer's lock: keep it short)."""

    set_scene: Callable[[str], Any]
    set_class_filter: Callable[[Optional[int]], Any]
    """None shows every class; an index keeps that class coloured and dims the rest."""
    set_colouring: Callable[[bool], Any]
    """True: the main RGB view shows the class colours blended over the render."""


def legend_image(classes: Sequence[str], palette: np.ndarray, columns: int = 2, row: int = 18) -> np.ndarray:
    """uint8 [H, W, 3]: a swatch and the name of every class, in ``columns`` columns."""
    rows = -(-len(classes) // columns)
    width = 170 * columns
    image = Image.new("RGB", (width, rows * row + 4), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(classes):
        x, y = (i // rows) * 170 + 4, (i % rows) * row + 2
        colour = tuple(int(round(float(c) * 255)) for c in palette[i])
        draw.rectangle([x, y + 2, x + 14, y + 14], fill=colour, outline=(90, 90, 90))
        draw.text((x + 20, y + 2), f"{i} {name}"[:24], fill=(20, 20, 20))
    return np.asarray(image)


class SemanticPanel(FolderPanel):
    """Scene, colouring and class-filter controls plus a legend (see the module docstring)."""

    def __init__(
        self,
        actions: SemanticActions,
        classes: Sequence[str],
        palette: np.ndarray,
        scenes: Sequence[str],
        scene: str,
        name: str = "Semantics",
    ) -> None:
        super().__init__(name, cb_hook=self._on_event)
        self.actions = actions
        self.classes = list(classes)
        self.palette = np.asarray(palette, dtype=np.float32)
        self._legend: Any = None
        self._handlers: Dict[int, Callable[[], None]] = {}

        def route(element: ViewerElement) -> None:
            self.cb_hook(element)

        self.scene = self._add(
            ViewerDropdown("Scene", scene, list(scenes), cb_hook=route, hint="Scene to show"), self.apply_scene
        )
        self.colouring = self._add(
            ViewerCheckbox("Colour by class", False, cb_hook=route, hint="Blend class colours over the RGB view"),
            self.apply_colouring,
        )
        self.class_filter = self._add(
            ViewerDropdown("Class filter", ALL_CLASSES, [ALL_CLASSES, *self.classes], cb_hook=route,
                           hint="Keep one class coloured, dim the others"),
            self.apply_filter,
        )  # fmt: skip

    def _add(self, element: Any, handler: Callable[[], None]) -> Any:
        self.elements.append(element)
        self._handlers[id(element)] = handler
        return element

    # ------------------------------------------------------------------ FolderPanel

    def install_extras(self, viser_server: ViserServer) -> None:
        folder = Path(tempfile.mkdtemp(prefix="gs_legend_"))
        Image.fromarray(legend_image(self.classes, self.palette)).save(folder / "legend.png")
        self._legend = viser_server.gui.add_markdown("**Classes**\n\n![legend](legend.png)", image_root=folder)

    def remove(self) -> None:
        if self._legend is not None:
            self._legend.remove()
            self._legend = None
        super().remove()

    def _on_event(self, source: Any) -> None:
        handler = self._handlers.get(id(source))
        if handler is not None:
            handler()

    # ------------------------------------------------------------------ actions

    def apply_scene(self) -> None:
        self.actions.set_scene(self.scene.value)

    def apply_colouring(self) -> None:
        self.actions.set_colouring(bool(self.colouring.value))

    def apply_filter(self) -> None:
        value = self.class_filter.value
        self.actions.set_class_filter(None if value == ALL_CLASSES else self.classes.index(value))
