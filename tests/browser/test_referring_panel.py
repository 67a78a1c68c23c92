"""The query panel of referspat-ext in a real headless Chromium against nerfstudio's viser viewer: the panel shows
(no click selection: referring is by expression), a typed expression tints the referred object, the threshold
slider empties the mask, isolate draws only the selection, and export writes it."""

from __future__ import annotations

import numpy as np
import pytest

from gsstudio_ext.core.ply import read_ply

try:  # tests/ is not a package: works both with rootdir on sys.path and with pytest's default rootdir insertion
    from tests.browser import viewer_page as vp
    from tests.browser.conftest import open_page, open_viewer
except ImportError:  # pragma: no cover
    import viewer_page as vp
    from conftest import open_page, open_viewer


pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXPRESSION = "the red car"
HIGHLIGHT = np.array([255, 64, 25])


@pytest.fixture(scope="module")
def refer_viewer(refer_run):
    with open_viewer(*refer_run) as run:
        yield run


@pytest.fixture(scope="module")
def refer_page(refer_viewer):
    with open_page(refer_viewer) as page:
        yield page


def test_expression_threshold_mode_and_export(refer_page, refer_viewer, shots):
    page, run = refer_page, refer_viewer
    page.get_by_text("Query", exact=True).scroll_into_view_if_needed()
    for label in ("Text", "Threshold", "Mode", "Status"):
        assert page.locator(f"label:text-is('{label}')").is_visible(), label
    assert page.get_by_role("button", name="Select by click").count() == 0
    base = vp.settle(page, run)
    shots(page, "11_refer_panel")

    car = vp.act(
        page, run, lambda: vp.type_query(page, EXPRESSION), lambda: vp.selected(run) > 0, "a referring selection"
    )
    shots(page, "12_refer_car")
    vp.wait_for(lambda: f'"{EXPRESSION}"' in vp.status(page), "the expression in the status line")
    region = vp.changed(car, base)
    assert 0.001 < region.mean() < 0.1, region.mean()  # one object, not the whole view
    assert np.abs(car[region] - HIGHLIGHT).sum(-1).mean() < np.abs(base[region] - HIGHLIGHT).sum(-1).mean()

    def empty_at_max() -> bool:
        return run.panel.threshold.value == 1.0 and run.model.query_state.selection is not None and not vp.selected(run)

    nothing = vp.act(
        page, run, lambda: vp.slide_threshold_to_max(page), empty_at_max, "an empty selection at threshold 1.0"
    )
    assert vp.changed(nothing, base).mean() < 0.2 * region.mean()  # no mask, no tint

    vp.act(
        page,
        run,
        lambda: vp.type_threshold(page, "0.5"),
        lambda: vp.selected(run) > 0,
        "the selection at threshold 0.5",
    )

    isolated = vp.act(
        page, run, vp.pick_mode(page, "isolate"), lambda: run.model.config.query.mode == "isolate", "isolate"
    )
    shots(page, "13_refer_isolate")
    white = lambda image: (image.min(axis=-1) > 235).mean()  # noqa: E731
    assert white(isolated) > white(car) + 0.3, (white(isolated), white(car))

    page.get_by_role("button", name="Export selection").click()
    path = run.run_dir / "exports" / "selection_0.ply"
    vp.wait_for(lambda: "wrote" in vp.status(page), "the export message")
    assert path.exists() and read_ply(path).num_gaussians == vp.selected(run)

    vp.act(page, run, vp.pick_mode(page, "highlight"), lambda: run.model.config.query.mode == "highlight", "highlight")
    cleared = vp.act(
        page, run, lambda: vp.type_query(page, ""), lambda: run.model.query_state.selection is None, "clear"
    )
    assert vp.changed(cleared, base).mean() < 0.2 * region.mean()
