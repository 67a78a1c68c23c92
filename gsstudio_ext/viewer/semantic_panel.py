"""A viewer panel for semantic segmentation: which scene to show, colour-by-class on the main view, a class filter,
and a colour legend of the class list.

Like :class:`~gsstudio_ext.viewer.query_panel.QueryPanel`, it is ONE nerfstudio ``ViewerElement`` made of
nerfstudio's own elements in a folder; the model attaches it as an attribute and nerfstudio's Viewer wraps its
``cb_hook`` (training lock + re-render). The legend is a Markdown image drawn once from the palette.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from nerfstudio.viewer.viewer_elements import ViewerCheckbox, ViewerDropdown, ViewerElement
from PIL import Image, ImageDraw
from viser import ViserServer

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


class SemanticPanel(ViewerElement):
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
        self._folder: Any = None
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
        self._handlers[id(element)] = handler
        return element

    @property
    def elements(self) -> List[ViewerElement]:
        return [self.scene, self.colouring, self.class_filter]

    # ------------------------------------------------------------------ ViewerElement

    def _create_gui_handle(self, viser_server: ViserServer) -> None:
        self._folder = viser_server.gui.add_folder(self.name)

    def install(self, viser_server: ViserServer) -> None:
        self._create_gui_handle(viser_server)
        with self._folder:
            for element in self.elements:
                element.install(viser_server)
            folder = Path(tempfile.mkdtemp(prefix="gs_legend_"))
            Image.fromarray(legend_image(self.classes, self.palette)).save(folder / "legend.png")
            self._legend = viser_server.gui.add_markdown("**Classes**\n\n![legend](legend.png)", image_root=folder)

    def remove(self) -> None:
        for element in self.elements:
            element.remove()
        if self._legend is not None:
            self._legend.remove()
        if self._folder is not None:
            self._folder.remove()
            self._folder = None

    def set_hidden(self, hidden: bool) -> None:
        for element in self.elements:
            if element.gui_handle is not None:
                element.set_hidden(hidden)

    def set_disabled(self, disabled: bool) -> None:
        for element in self.elements:
            if element.gui_handle is not None:
                element.set_disabled(disabled)

    def set_visible(self, visible: bool) -> None:
        self.set_hidden(not visible)

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
