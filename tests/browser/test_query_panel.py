"""The query panel of ag2aussian-ext in a real headless Chromium against nerfstudio's viser viewer: the panel shows,
a typed query highlights the object, the threshold slider and the mode dropdown change the image, a click selects
the object under it and places a marker, undo restores the previous state, and export writes the selection."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pytest
import torch

from gsstudio_ext.core.ply import read_ply

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Not the bare label "duck": the label provider's embedding of an object's own name matches it with cosine 1.0000002,
# which passes even a threshold of 1.0.
QUERY = "the duck"
HIGHLIGHT = np.array([255, 64, 25])  # the model's default highlight tint (1.0, 0.25, 0.1)


# ---------------------------------------------------------------------------------------------------- page helpers


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


# ---------------------------------------------------------------------------------------------------- tests


def test_panel_shows_its_controls_and_the_scene(browser_page, ag2_viewer, shots):
    page, run = browser_page, ag2_viewer
    page.get_by_text("Query", exact=True).scroll_into_view_if_needed()
    for label in ("Text", "Negatives", "Threshold", "Mode", "Add to selection", "Status"):
        assert page.locator(f"label:text-is('{label}')").is_visible(), label
    for name in ("Select by click", "Undo", "Clear", "Export selection"):
        assert page.get_by_role("button", name=name).is_visible(), name
    assert all(element.gui_handle is not None for element in run.panel.elements)
    assert control(page, "Threshold").input_value() == "0.5" and control(page, "Mode").input_value() == "highlight"
    image = settle(page, run)
    shots(page, "01_panel")
    # the scene is drawn: a bright floor with saturated objects, not an empty canvas
    saturation = image.max(axis=-1) - image.min(axis=-1)
    assert image.std() > 20 and (saturation > 80).mean() > 0.01, (image.std(), (saturation > 80).mean())


def test_text_query_threshold_and_mode_change_the_image(browser_page, ag2_viewer, shots):
    page, run = browser_page, ag2_viewer
    base = settle(page, run)
    duck = act(page, run, lambda: type_query(page, QUERY), lambda: selected(run) > 0, "a text selection")
    shots(page, "02_duck_highlight")
    wait_for(lambda: f'"{QUERY}"' in status(page), "the query in the status line")
    assert status(page).startswith(f"{selected(run)} selected")
    region = changed(duck, base)
    assert 0.001 < region.mean() < 0.1, region.mean()  # one object (and a few floaters), not the whole view
    # the changed pixels moved towards the highlight tint
    assert np.abs(duck[region] - HIGHLIGHT).sum(-1).mean() < np.abs(base[region] - HIGHLIGHT).sum(-1).mean()

    slider = row(page, "Threshold").locator("[role=slider]")

    def slide_to_max() -> None:
        slider.focus()
        slider.press("End")  # the slider's maximum: 1.0

    def empty_at_max() -> bool:
        return run.panel.threshold.value == 1.0 and run.model.query_state.selection is not None and not selected(run)

    nothing = act(page, run, slide_to_max, empty_at_max, "an empty selection at threshold 1.0")
    shots(page, "03_threshold_1")
    assert changed(nothing, base).mean() < 0.2 * region.mean()  # the highlight is gone
    assert changed(nothing, duck).mean() > 0.5 * region.mean()

    def type_threshold() -> None:
        control(page, "Threshold").fill("0.5")
        control(page, "Threshold").press("Enter")

    duck_again = act(page, run, type_threshold, lambda: selected(run) > 0, "the selection at threshold 0.5")
    assert changed(duck_again, duck).mean() < 0.2 * region.mean()

    def pick_mode(name: str) -> Callable[[], None]:
        def pick() -> None:
            control(page, "Mode").click()
            page.get_by_role("option", name=name).click()

        return pick

    isolated = act(page, run, pick_mode("isolate"), lambda: run.model.config.query.mode == "isolate", "isolate")
    shots(page, "04_isolate")
    # only the selection is drawn: most of the view turns to the white background, the duck stays
    white = lambda image: (image.min(axis=-1) > 235).mean()  # noqa: E731
    assert white(isolated) > white(duck_again) + 0.3, (white(isolated), white(duck_again))
    kept = changed(base, isolated)
    assert (~kept[region]).mean() > 0.3, (~kept[region]).mean()  # much of the highlighted region is still drawn

    act(page, run, pick_mode("highlight"), lambda: run.model.config.query.mode == "highlight", "highlight")
    cleared = act(page, run, lambda: type_query(page, ""), lambda: run.model.query_state.selection is None, "clear")
    assert changed(cleared, base).mean() < 0.2 * region.mean()


def test_click_selects_marks_exports_and_undoes(browser_page, ag2_viewer, shots):
    page, run = browser_page, ag2_viewer
    base = settle(page, run)
    duck = act(page, run, lambda: type_query(page, QUERY), lambda: selected(run) > 0, "a text selection")
    by_text = run.model.query_state.selection.clone()
    # aim at the middle of the selected Gaussians (the median ignores the few floaters the query also picks)
    middle = run.model.means.detach()[by_text.to(run.model.device)].cpu().median(dim=0).values
    x, y = screen_point(page, run, middle)
    box = canvas_box(page)
    assert changed(duck, base)[y, x], "the aim point is not on the highlighted object"

    page.get_by_role("button", name="Select by click").click()
    wait_for(lambda: "click an object" in status(page), "the click prompt")
    clicked = act(page, run, lambda: page.mouse.click(box["x"] + x, box["y"] + y),
                  lambda: run.panel.markers, "a marker")  # fmt: skip
    shots(page, "05_click_marker")
    wait_for(lambda: "selected by click" in status(page), "the click status")
    by_click = run.model.query_state.selection.clone()
    assert by_click.sum() > 0 and not torch.equal(by_click, by_text)
    overlap = float((by_click & by_text).sum() / by_click.sum())
    assert overlap >= 0.8, overlap  # the click landed on the duck
    (marker,) = run.panel.markers
    assert marker.visible
    # the marker sits on the clicked object's Gaussians
    point = torch.tensor(run.panel.marker_positions[0])
    nearest = float((run.model.means.detach()[by_click.to(run.model.device)].cpu() - point).norm(dim=-1).min())
    assert nearest < 0.05 * float(run.model.scene_extent), nearest
    # and is drawn: marker-coloured pixels around the click, none there before
    magenta = lambda image: (image[..., 0] > 200) & (image[..., 1] < 90) & (image[..., 2] > 170)  # noqa: E731
    around = (slice(max(0, y - 40), y + 40), slice(max(0, x - 40), x + 40))
    assert magenta(clicked)[around].sum() >= 50 and magenta(duck)[around].sum() == 0, magenta(clicked)[around].sum()

    page.get_by_role("button", name="Export selection").click()
    path = run.run_dir / "exports" / "selection_0.ply"
    wait_for(lambda: "wrote" in status(page), "the export message")
    assert path.exists() and read_ply(path).num_gaussians == int(by_click.sum())
    assert f"wrote {int(by_click.sum())} Gaussians to selection_0.ply" in status(page)

    undone = act(page, run, lambda: page.get_by_role("button", name="Undo").click(),
                 lambda: not run.panel.markers, "the marker to go")  # fmt: skip
    shots(page, "06_undo")
    assert torch.equal(run.model.query_state.selection, by_text)
    assert magenta(undone)[around].sum() == 0
    assert changed(undone, duck).sum() < 0.2 * changed(clicked, duck).sum()

    act(page, run, lambda: type_query(page, ""), lambda: run.model.query_state.selection is None, "clear")
