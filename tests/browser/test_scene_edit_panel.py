"""The Scene editing panel of rl3dedit-ext in a real headless Chromium against nerfstudio's viser viewer: no part
controls; the before/after toggle switches between the original and the edited scene; a typed instruction with "Run
edit" edits the whole scene in one pass (offline procedural editor, a short refit); "Undo edit" restores it; "Export
.ply" writes the scene."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import pytest

try:  # tests/ is not a package: works both with rootdir on sys.path and with pytest's default rootdir insertion
    from tests.browser import viewer_page as vp
    from tests.browser.conftest import open_page, open_viewer
except ImportError:  # pragma: no cover
    import viewer_page as vp
    from conftest import open_page, open_viewer


pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def rl3dedit_viewer(rl3dedit_run):
    model = rl3dedit_run[0].pipeline.model
    saved = (copy.deepcopy(model.state_dict()), model.config.show_edit, list(model.history), model.config.edit.refit)
    model.config.edit.refit = replace(model.config.edit.refit, steps=30)  # a short refit: the test is the panel
    try:
        with open_viewer(*rl3dedit_run) as run:
            yield run
    finally:
        state, model.config.show_edit, model.history, model.config.edit.refit = saved
        model.load_state_dict(state)


@pytest.fixture(scope="module")
def rl3dedit_page(rl3dedit_viewer):
    with open_page(rl3dedit_viewer, ready_label="Edit prompt") as page:
        yield page


def _click(page, name: str):
    return lambda: page.get_by_role("button", name=name, exact=True).click()


def test_scene_edit_panel_toggle_edit_undo_export(rl3dedit_page, rl3dedit_viewer, shots, tmp_path: Path) -> None:
    page, run = rl3dedit_page, rl3dedit_viewer
    model = run.model
    page.get_by_text("Scene editing", exact=True).scroll_into_view_if_needed()
    for label in ("Edit prompt", "Show edit (after)", "Export path", "Status"):
        assert page.locator(f"label:text-is('{label}')").is_visible(), label
    for label in ("Parts", "Edit part"):
        assert page.locator(f"label:text-is('{label}')").count() == 0, label
    after = vp.settle(page, run)
    shots(page, "41_scene_edit_after")
    before = vp.act(page, run, vp.toggle(page, "Show edit (after)"), lambda: not model.config.show_edit, "before")
    shots(page, "42_scene_edit_before")
    toggled = vp.changed(before, after).mean()
    assert toggled > 0.01, toggled  # the blue mushroom is its own colour again
    plain = vp.act(page, run, vp.toggle(page, "Show edit (after)"), lambda: model.config.show_edit, "after")

    vp.control(page, "Edit prompt").fill("red")
    vp.control(page, "Edit prompt").press("Enter")
    _click(page, "Run edit")()
    vp.wait_for(lambda: vp.status(page).startswith("edited: red"), "status 'edited: red'", timeout=600)
    edited = vp.settle(page, run, since=time.monotonic())
    shots(page, "43_scene_edit_red")
    assert "procedural" in vp.status(page)
    assert [r["instruction"] for r in model.edit_records()][-1] == "red"
    repainted = vp.changed(edited, plain).mean()
    print(f"changed share of the viewer image: toggle {toggled:.3f}, red edit {repainted:.3f}")
    assert repainted > 0.01, repainted

    undone = vp.act(page, run, _click(page, "Undo edit"), lambda: vp.status(page) == "undone", "undo")
    assert vp.changed(undone, plain).mean() < repainted / 4

    target = tmp_path / "rl3dedit.ply"
    vp.control(page, "Export path").fill(str(target))
    vp.control(page, "Export path").press("Enter")
    vp.act(page, run, _click(page, "Export .ply"), lambda: vp.status(page).startswith("exported"), "the export")
    assert target.is_file() and target.stat().st_size > 1000
