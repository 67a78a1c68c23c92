"""Helpers for driving nerfstudio's viewer page (viser) in Playwright: panel rows and inputs, canvas grabs, waiting
for renders instead of sleeping."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch


def row(page: Any, label: str) -> Any:
    """The panel row labelled ``label``: the innermost element holding both the label and an input."""
    rows = page.locator("div").filter(has=page.locator(f"label:text-is('{label}')")).filter(has=page.locator("input"))
    return rows.last


def control(page: Any, label: str) -> Any:
    """The input of the row labelled ``label`` (viser does not tie its labels to text inputs)."""
    return row(page, label).locator("input:visible").first


def canvas_box(page: Any) -> dict:
    """Page box of the three.js canvas (the 3D view; a 2D overlay canvas spans the whole page)."""
    box = page.locator("canvas[data-engine]").bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 200, box
    return box


def grab(page: Any) -> np.ndarray:
    """The 3D view (canvas) as an RGB int array."""
    import io

    from PIL import Image

    png = page.screenshot(clip=canvas_box(page))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels whose colour moved by more than JPEG noise."""
    return np.abs(a - b).max(axis=-1) > 40


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def settle(page: Any, run: Any, since: float = float("-inf")) -> np.ndarray:
    """Wait for the viewer's image sent after time ``since`` at full resolution, with nothing sent for 0.3 s since,
    then until the canvas shows it steadily; returns the canvas image."""

    def rendered() -> bool:
        if not run.frames:
            return False
        sent, height, width = run.frames[-1]
        machines = list(run.viewer.render_statemachines.values())
        return (
            sent > since
            and max(height, width) >= max_res(run)
            and all(m.state == "high" for m in machines)
            and time.monotonic() - sent > 0.3
        )

    wait_for(rendered, "a full-resolution render")
    last = grab(page)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.15)
        image = grab(page)
        if not changed(image, last).any():
            return image
        last = image
    raise AssertionError("the canvas did not settle")


def act(page: Any, run: Any, action: Callable[[], Any], effect: Callable[[], Any], what: str) -> np.ndarray:
    """Do ``action`` in the page, wait for its ``effect`` on the server, then for the re-render it triggers (the
    viewer re-renders after a panel callback returns, so that render is sent after the effect is seen)."""
    action()
    wait_for(effect, what)
    return settle(page, run, since=time.monotonic())


def max_res(run: Any) -> int:
    return int(run.viewer.control_panel.max_res)


def selected(run: Any) -> int:
    selection = run.model.query_state.selection
    return 0 if selection is None else int(selection.sum())


def status(page: Any) -> str:
    return control(page, "Status").input_value()


def type_query(page: Any, text: str) -> None:
    box = control(page, "Text")
    box.fill(text)
    box.press("Enter")


def screen_point(page: Any, run: Any, point: torch.Tensor) -> tuple:
    """(x, y) in the canvas where the world point shows, from the client's camera (viser: OpenCV axes, world scaled
    by nerfstudio's ratio; vertical field of view)."""
    import viser.transforms as vtf
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    (client,) = run.viewer.viser_server.get_clients().values()
    rotation = vtf.SO3(client.camera.wxyz).as_matrix()
    local = rotation.T @ (point.numpy() * VISER_NERFSTUDIO_SCALE_RATIO - client.camera.position)
    box = canvas_box(page)
    focal = box["height"] / 2 / np.tan(client.camera.fov / 2)
    return int(box["width"] / 2 + focal * local[0] / local[2]), int(box["height"] / 2 + focal * local[1] / local[2])


def slide_threshold_to_max(page: Any) -> None:
    """Move the Threshold slider to its maximum (1.0) with the keyboard."""
    slider = row(page, "Threshold").locator("[role=slider]")
    slider.focus()
    slider.press("End")


def type_threshold(page: Any, value: str) -> None:
    control(page, "Threshold").fill(value)
    control(page, "Threshold").press("Enter")


def pick_option(page: Any, label: str, name: str) -> Callable[[], None]:
    """An action choosing ``name`` in the dropdown labelled ``label``."""

    def pick() -> None:
        control(page, label).click()
        page.get_by_role("option", name=name, exact=True).click()

    return pick


def pick_mode(page: Any, name: str) -> Callable[[], None]:
    """An action choosing ``name`` in the Mode dropdown."""
    return pick_option(page, "Mode", name)


def toggle(page: Any, label: str) -> Callable[[], None]:
    """An action clicking the checkbox labelled ``label``."""
    return row(page, label).locator("input[type=checkbox]").first.click
