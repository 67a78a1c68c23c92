"""The query panel of ag2aussian-ext in a real headless Chromium against nerfstudio's viser viewer: the panel shows,
a typed query highlights the object, the threshold slider and the mode dropdown change the image, a click selects
the object under it and places a marker, undo restores the previous state, and export writes the selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsstudio_ext.core.ply import read_ply

try:  # tests/ is not a package: works both with rootdir on sys.path and with pytest's default rootdir insertion
    from tests.browser import viewer_page as vp
except ImportError:  # pragma: no cover
    import viewer_page as vp


pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Not the bare label "duck": the label provider's embedding of an object's own name matches it with cosine 1.0000002,
# which passes even a threshold of 1.0.
QUERY = "the duck"
HIGHLIGHT = np.array([255, 64, 25])  # the model's default highlight tint (1.0, 0.25, 0.1)


# ---------------------------------------------------------------------------------------------------- tests


def test_panel_shows_its_controls_and_the_scene(browser_page, ag2_viewer, shots):
    page, run = browser_page, ag2_viewer
    page.get_by_text("Query", exact=True).scroll_into_view_if_needed()
    for label in ("Text", "Negatives", "Threshold", "Mode", "Add to selection", "Status"):
        assert page.locator(f"label:text-is('{label}')").is_visible(), label
    for name in ("Select by click", "Undo", "Clear", "Export selection"):
        assert page.get_by_role("button", name=name).is_visible(), name
    assert all(element.gui_handle is not None for element in run.panel.elements)
    assert (
        vp.control(page, "Threshold").input_value() == "0.5" and vp.control(page, "Mode").input_value() == "highlight"
    )
    image = vp.settle(page, run)
    shots(page, "01_panel")
    # the scene is drawn: a bright floor with saturated objects, not an empty canvas
    saturation = image.max(axis=-1) - image.min(axis=-1)
    assert image.std() > 20 and (saturation > 80).mean() > 0.01, (image.std(), (saturation > 80).mean())


def test_text_query_threshold_and_mode_change_the_image(browser_page, ag2_viewer, shots):
    page, run = browser_page, ag2_viewer
    base = vp.settle(page, run)
    duck = vp.act(page, run, lambda: vp.type_query(page, QUERY), lambda: vp.selected(run) > 0, "a text selection")
    shots(page, "02_duck_highlight")
    vp.wait_for(lambda: f'"{QUERY}"' in vp.status(page), "the query in the status line")
    assert vp.status(page).startswith(f"{vp.selected(run)} selected")
    region = vp.changed(duck, base)
    assert 0.001 < region.mean() < 0.1, region.mean()  # one object (and a few floaters), not the whole view
    # the changed pixels moved towards the highlight tint
    assert np.abs(duck[region] - HIGHLIGHT).sum(-1).mean() < np.abs(base[region] - HIGHLIGHT).sum(-1).mean()

    def empty_at_max() -> bool:
        return run.panel.threshold.value == 1.0 and run.model.query_state.selection is not None and not vp.selected(run)

    nothing = vp.act(
        page, run, lambda: vp.slide_threshold_to_max(page), empty_at_max, "an empty selection at threshold 1.0"
    )
    shots(page, "03_threshold_1")
    assert vp.changed(nothing, base).mean() < 0.2 * region.mean()  # the highlight is gone
    assert vp.changed(nothing, duck).mean() > 0.5 * region.mean()

    duck_again = vp.act(
        page,
        run,
        lambda: vp.type_threshold(page, "0.5"),
        lambda: vp.selected(run) > 0,
        "the selection at threshold 0.5",
    )
    assert vp.changed(duck_again, duck).mean() < 0.2 * region.mean()

    isolated = vp.act(
        page, run, vp.pick_mode(page, "isolate"), lambda: run.model.config.query.mode == "isolate", "isolate"
    )
    shots(page, "04_isolate")
    # only the selection is drawn: most of the view turns to the white background, the duck stays
    white = lambda image: (image.min(axis=-1) > 235).mean()  # noqa: E731
    assert white(isolated) > white(duck_again) + 0.3, (white(isolated), white(duck_again))
    kept = vp.changed(base, isolated)
    assert (~kept[region]).mean() > 0.3, (~kept[region]).mean()  # much of the highlighted region is still drawn

    vp.act(page, run, vp.pick_mode(page, "highlight"), lambda: run.model.config.query.mode == "highlight", "highlight")
    cleared = vp.act(
        page, run, lambda: vp.type_query(page, ""), lambda: run.model.query_state.selection is None, "clear"
    )
    assert vp.changed(cleared, base).mean() < 0.2 * region.mean()


def test_click_selects_marks_exports_and_undoes(browser_page, ag2_viewer, shots):
    page, run = browser_page, ag2_viewer
    base = vp.settle(page, run)
    duck = vp.act(page, run, lambda: vp.type_query(page, QUERY), lambda: vp.selected(run) > 0, "a text selection")
    by_text = run.model.query_state.selection.clone()
    # aim at the middle of the selected Gaussians (the median ignores the few floaters the query also picks)
    middle = run.model.means.detach()[by_text.to(run.model.device)].cpu().median(dim=0).values
    x, y = vp.screen_point(page, run, middle)
    box = vp.canvas_box(page)
    assert vp.changed(duck, base)[y, x], "the aim point is not on the highlighted object"

    page.get_by_role("button", name="Select by click").click()
    vp.wait_for(lambda: "click an object" in vp.status(page), "the click prompt")
    clicked = vp.act(page, run, lambda: page.mouse.click(box["x"] + x, box["y"] + y),
                  lambda: run.panel.markers, "a marker")  # fmt: skip
    shots(page, "05_click_marker")
    vp.wait_for(lambda: "selected by click" in vp.status(page), "the click status")
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
    vp.wait_for(lambda: "wrote" in vp.status(page), "the export message")
    assert path.exists() and read_ply(path).num_gaussians == int(by_click.sum())
    assert f"wrote {int(by_click.sum())} Gaussians to selection_0.ply" in vp.status(page)

    undone = vp.act(page, run, lambda: page.get_by_role("button", name="Undo").click(),
                 lambda: not run.panel.markers, "the marker to go")  # fmt: skip
    shots(page, "06_undo")
    assert torch.equal(run.model.query_state.selection, by_text)
    assert magenta(undone)[around].sum() == 0
    assert vp.changed(undone, duck).sum() < 0.2 * vp.changed(clicked, duck).sum()

    vp.act(page, run, lambda: vp.type_query(page, ""), lambda: run.model.query_state.selection is None, "clear")
