"""A viewer panel made of nerfstudio's own elements in one viser folder, installed as ONE ``ViewerElement``.

nerfstudio's Viewer finds the panel on the model, wraps its ``cb_hook`` (training lock + re-render) and calls
``install`` once in its "Custom Elements" folder. Subclasses fill ``elements`` (display order) and may add
``read_only`` elements that stay disabled, and extra viser widgets in :meth:`install_extras`.
"""

from __future__ import annotations

from typing import Any, Callable, List

from nerfstudio.viewer.viewer_elements import ViewerElement
from viser import ViserServer


class FolderPanel(ViewerElement):
    def __init__(self, name: str, cb_hook: Callable[[Any], Any]) -> None:
        super().__init__(name, cb_hook=cb_hook)
        self.elements: List[ViewerElement] = []
        """Child elements in display order."""
        self.read_only: List[ViewerElement] = []
        """Children that ``set_disabled(False)`` leaves disabled (status lines)."""
        self._folder: Any = None

    def _create_gui_handle(self, viser_server: ViserServer) -> None:
        self._folder = viser_server.gui.add_folder(self.name)

    def install(self, viser_server: ViserServer) -> None:
        """Add the folder, the controls and any extras."""
        self._create_gui_handle(viser_server)
        with self._folder:
            for element in self.elements:
                element.install(viser_server)
            self.install_extras(viser_server)

    def install_extras(self, viser_server: ViserServer) -> None:
        """Add viser widgets that are not nerfstudio elements (inside the folder)."""

    def remove(self) -> None:
        for element in self.elements:
            element.remove()
        if self._folder is not None:
            self._folder.remove()
            self._folder = None

    def set_hidden(self, hidden: bool) -> None:
        for element in self.elements:
            if element.gui_handle is not None:
                element.set_hidden(hidden)

    def set_disabled(self, disabled: bool) -> None:
        for element in self.elements:
            if element.gui_handle is not None and element not in self.read_only:
                element.set_disabled(disabled)

    def set_visible(self, visible: bool) -> None:
        self.set_hidden(not visible)
