"""The Semantics panel of rtgs2-ext in a real headless Chromium against nerfstudio's viser viewer: the panel and its
class legend show, "Colour by class" paints the predicted classes over the view, the class filter keeps one class
coloured, and the scene dropdown switches to another scene."""

from __future__ import annotations

import numpy as np
import pytest

try:  # tests/ is not a package: works both with rootdir on sys.path and with pytest's default rootdir insertion
    from tests.browser import viewer_page as vp
    from tests.browser.conftest import open_page, open_viewer
except ImportError:  # pragma: no cover
    import viewer_page as vp
    from conftest import open_page, open_viewer


pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def rtgs2_viewer(rtgs2_run):
    model = rtgs2_run[0].pipeline.model
    saved = (model.active_scene, model.colour_rgb, model.class_filter)
    try:
        with open_viewer(*rtgs2_run) as run:
            yield run
    finally:
        model.active_scene, model.colour_rgb, model.class_filter = saved


@pytest.fixture(scope="module")
def rtgs2_page(rtgs2_viewer):
    with open_page(rtgs2_viewer, ready_label="Class filter") as page:
        yield page


def test_colouring_filter_and_scene(rtgs2_page, rtgs2_viewer, shots):
    page, run = rtgs2_page, rtgs2_viewer
    model = run.model
    page.get_by_text("Semantics", exact=True).scroll_into_view_if_needed()
    for label in ("Scene", "Colour by class", "Class filter"):
        assert page.locator(f"label:text-is('{label}')").is_visible(), label
    legend = page.locator("img[alt='legend']")
    assert legend.is_visible() and legend.bounding_box()["height"] > 60
    base = vp.settle(page, run)
    shots(page, "21_semantic_panel")

    coloured = vp.act(page, run, vp.toggle(page, "Colour by class"), lambda: model.colour_rgb, "class colouring")
    shots(page, "22_semantic_colours")
    painted = vp.changed(coloured, base).mean()
    assert painted > 0.05, painted  # the objects (and the table, class 0 drawn black) are tinted

    name = model.classes[int(np.bincount(_predicted(run).ravel(), minlength=len(model.classes))[1:].argmax()) + 1]
    filtered = vp.act(
        page, run, vp.pick_option(page, "Class filter", name), lambda: model.class_filter is not None, "a class filter"
    )
    shots(page, "23_semantic_filter")
    assert model.classes[model.class_filter] == name
    untinted = vp.changed(filtered, coloured).mean()
    assert 0.01 < untinted < painted, (untinted, painted)  # the other classes lose their tint, this one keeps it

    other = next(s for s in run.pipeline.datamanager.scenes if s != model.active_scene)
    switched = vp.act(
        page, run, vp.pick_option(page, "Scene", other), lambda: model.active_scene == other, "the other scene"
    )
    shots(page, "24_semantic_scene")
    assert vp.changed(switched, filtered).mean() > 0.05


def _predicted(run) -> np.ndarray:
    camera, _ = run.pipeline.datamanager.fixed_indices_eval_dataloader[0]
    return run.model.get_outputs_for_camera(camera)["semantic_ids"].cpu().numpy()
