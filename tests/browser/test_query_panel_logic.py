"""The query panel without a browser (fast): which controls a method gets, what each control calls, the click
markers' undo bookkeeping on a real viser server, export naming, and the ray -> camera + pixel conversion."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import pytest
import torch
from nerfstudio.viewer.viewer_elements import ViewerClick, ViewerControl

from gsstudio_ext.viewer.query_panel import PanelActions, QueryPanel, split_phrases
from gsstudio_ext.viewer.ray_camera import pixel_to_world, ray_camera


class FakeMethod:
    """Records what the panel asks for; the "selection" is a count with an undo stack."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.selection = 0
        self.history: List[int] = []
        self.hit: Optional[torch.Tensor] = torch.tensor([0.1, 0.2, 0.3])

    def _push(self, value: int) -> None:
        self.history.append(self.selection)
        self.selection = value

    def text_query(self, text: str, negatives: tuple, threshold: float) -> None:
        if text == "bad":
            raise ValueError("no such thing")
        self.calls.append(("text", text, negatives, threshold))
        self._push(len(text))

    def click(self, camera, x: int, y: int, add: bool) -> Optional[torch.Tensor]:
        self.calls.append(("click", int(camera.width), x, y, add))
        if self.hit is not None:
            self._push(self.selection + 7 if add else 7)
        return self.hit

    def undo(self) -> bool:
        if not self.history:
            return False
        self.selection = self.history.pop()
        return True

    def export(self, path: Path) -> int:
        path.write_text("ply")
        return self.selection

    def actions(self, **drop: bool) -> PanelActions:
        actions = PanelActions(
            text_query=self.text_query, clear=lambda: self._push(0), set_mode=lambda m: self.calls.append(("mode", m)),
            click=self.click, undo=self.undo, export=self.export, selection_size=lambda: self.selection,
        )  # fmt: skip
        for name in drop:
            setattr(actions, name, None)
        return actions


def labels(panel: QueryPanel) -> List[str]:
    return [element.name for element in panel.elements]


def test_a_method_gets_only_the_controls_it_supports():
    method = FakeMethod()
    full = QueryPanel(method.actions(), ViewerControl())
    assert labels(full) == ["Text", "Negatives", "Threshold", "Mode", "Select by click", "Add to selection", "Undo",
                            "Clear", "Export selection", "Status"]  # fmt: skip
    # an editing method: click select + undo + export, no text
    editing = QueryPanel(method.actions(text_query=True, set_mode=True, clear=True), ViewerControl())
    assert labels(editing) == ["Select by click", "Add to selection", "Undo", "Export selection", "Status"]
    # a referring-segmentation method without a ViewerControl: no click select
    referring = QueryPanel(method.actions(click=True, export=True))
    assert labels(referring) == ["Text", "Negatives", "Threshold", "Mode", "Undo", "Clear", "Status"]


def test_query_controls_call_the_method_once_per_change():
    method = FakeMethod()
    panel = QueryPanel(method.actions(), threshold=0.4)
    panel.text.value = " mug "
    panel.cb_hook(panel.text)
    panel.cb_hook(panel.text)  # the same query again: not re-run
    panel.negatives.value = "table, , chair "
    panel.cb_hook(panel.negatives)
    panel.threshold.value = 0.8
    panel.cb_hook(panel.threshold)
    assert method.calls == [("text", "mug", (), 0.4), ("text", "mug", ("table", "chair"), 0.4),
                            ("text", "mug", ("table", "chair"), 0.8)]  # fmt: skip
    assert panel.status.value == '3 selected | "mug"'
    panel.text.value = "bad"
    panel.cb_hook(panel.text)
    assert panel.status.value == "3 selected | error: no such thing"
    panel.text.value = ""
    panel.cb_hook(panel.text)  # emptied: cleared
    assert method.selection == 0 and panel.status.value == "0 selected | cleared"
    panel.mode.value = "isolate"
    panel.cb_hook(panel.mode)
    assert method.calls[-1] == ("mode", "isolate")
    panel.cb_hook(panel.undo_button)
    assert method.selection == 3 and panel.status.value == "3 selected | undone"
    assert split_phrases(" a ,b,, c") == ("a", "b", "c")


@pytest.fixture
def viser_server():
    import viser

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)
    yield server
    server.stop()


def test_clicks_place_markers_that_undo_and_clear_hide_and_restore(viser_server, tmp_path: Path):
    method = FakeMethod()
    control = ViewerControl()
    # what nerfstudio's Viewer sets up on a ViewerControl it finds on the model
    control.viser_server = viser_server
    control.viewer = SimpleNamespace(log_filename=tmp_path / "run" / "viewer_log_filename.txt")
    panel = QueryPanel(method.actions(), control)
    panel.install(viser_server)
    assert all(element.gui_handle is not None for element in panel.elements)

    click = ViewerClick(origin=(0.0, 0.0, 2.0), direction=(0.0, 0.0, -1.0), screen_pos=(0.5, 0.5))
    panel.cb_hook(click)
    assert method.calls[-1] == ("click", 17, 8, 8, False)  # a 17x17 ray camera, its centre pixel
    (first,) = panel.markers
    assert first.visible and torch.allclose(torch.tensor(panel.marker_positions[0]), method.hit)
    panel.add_to_selection.value = True
    panel.cb_hook(click)
    assert method.calls[-1][-1] is True and method.selection == 14
    assert [m.visible for m in panel.markers] == [True, True]
    panel.add_to_selection.value = False
    panel.cb_hook(click)  # a new selection hides the earlier markers
    assert [m.visible for m in panel.markers] == [False, False, True]
    panel.cb_hook(panel.undo_button)
    assert [m.visible for m in panel.markers] == [True, True] and method.selection == 14
    panel.cb_hook(panel.clear_button)
    assert [m.visible for m in panel.markers] == [False, False] and method.selection == 0
    panel.cb_hook(panel.undo_button)
    assert [m.visible for m in panel.markers] == [True, True]
    panel.cb_hook(panel.undo_button)
    assert panel.markers == [first] and method.selection == 7
    method.hit = None
    panel.cb_hook(click)  # the ray hits nothing: no marker, nothing to undo
    assert panel.markers == [first] and panel.status.value == "7 selected | nothing under the click"

    panel.cb_hook(panel.export_button)
    panel.cb_hook(panel.export_button)
    exports = tmp_path / "run" / "exports"
    assert panel.exported == [exports / "selection_0.ply", exports / "selection_1.ply"]
    assert all(path.read_text() == "ply" for path in panel.exported)
    assert panel.status.value == "7 selected | wrote 7 Gaussians to selection_1.ply"

    panel.remove()
    assert panel.markers == [] and all(element.gui_handle is None for element in panel.elements)


def test_click_without_a_set_up_control_says_so():
    panel = QueryPanel(FakeMethod().actions(), ViewerControl())
    panel.cb_hook(panel.click_button)
    assert "ViewerControl" in panel.status.value


@pytest.mark.parametrize(
    "origin, direction",
    [((0.0, 0.0, 0.0), (0.0, 0.0, -1.0)), ((1.0, -2.0, 0.5), (0.3, 0.9, -0.2)), ((0.2, 0.1, 3.0), (1.0, 0.0, 0.0))],
)
def test_ray_camera_centre_pixel_sees_the_ray(origin, direction):
    camera, x, y = ray_camera(origin, direction)
    rays = camera.generate_rays(camera_indices=0)  # nerfstudio's own rays of that camera
    unit = torch.tensor(direction) / torch.tensor(direction).norm()
    assert torch.allclose(rays.origins[y, x], torch.tensor(origin), atol=1e-6)
    assert torch.allclose(rays.directions[y, x], unit, atol=1e-5)
    assert torch.allclose(pixel_to_world(camera, x, y, 2.5), torch.tensor(origin) + 2.5 * unit, atol=1e-5)
    # an off-centre pixel: the point lies on that pixel's ray
    offset = pixel_to_world(camera, 0, 3, 2.0) - torch.tensor(origin)
    assert torch.linalg.cross(offset, rays.directions[3, 0]).norm() < 1e-5 and offset @ rays.directions[3, 0] > 0
    with pytest.raises(ValueError, match="non-zero"):
        ray_camera(origin, (0.0, 0.0, 0.0))
