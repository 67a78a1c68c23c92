"""Browser-test fixtures: nerfstudio's viser viewer for the trained ``ag2_run`` pipeline on a free 127.0.0.1 port,
with the query panel attached, and a headless Debian Chromium (software WebGL) driven by Playwright.

No browser is downloaded: Playwright drives the system binary. Requests that do not go to 127.0.0.1 are aborted
in the page (the viewer's title bar links to nerf.studio images), so the tests never touch a network.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
]
VIEWPORT = {"width": 1100, "height": 1250}
SHOTS = Path("/tmp/viewer_shots")


def chromium_binary() -> Optional[str]:
    """The system Chromium (``GSSTUDIO_CHROMIUM`` overrides), or None."""
    for candidate in (os.environ.get("GSSTUDIO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Skip browser tests up front (before the ag2 run trains) when there is no Chromium."""
    if chromium_binary() is not None:
        return
    skip = pytest.mark.skip(reason="no Chromium binary (apt-get install chromium, or set GSSTUDIO_CHROMIUM)")
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_selection(model: Any) -> Callable[[Path], int]:
    """Export action for the tests: the selected children of an ag2aussian-ext model as a 3DGS .ply (core)."""
    from gsstudio_ext.core.ply import write_ply
    from gsstudio_ext.core.scene import GaussianScene

    def export(path: Path) -> int:
        selection = model.query_state.selection
        if selection is None or not bool(selection.any()):
            raise ValueError("nothing selected to export")
        params = model.gauss_params
        scene = GaussianScene.from_splatfacto_params(
            {
                "means": model.means,
                "scales": params["scales"],
                "quats": params["quats"],
                "features_dc": params["features_dc"],
                "features_rest": params["features_rest"],
                "opacities": params["opacities"],
            }
        ).subset(selection.cpu())
        write_ply(path, scene.detach().to("cpu"), comments=["gsstudio_ext viewer selection"])
        return scene.num_gaussians

    return export


@dataclass
class ViewerRun:
    """A running viewer of the ag2 run: the nerfstudio Viewer, its pipeline's model, the panel and the URL."""

    viewer: Any
    model: Any
    panel: Any
    url: str
    run_dir: Path
    pipeline: Any
    frames: List[Tuple[float, int, int]] = field(default_factory=list)
    """(time, height, width) of every image the viewer sent to the browser (see ``count_frames``)."""


@pytest.fixture(scope="module")
def ag2_viewer(ag2_run) -> Iterator[ViewerRun]:
    """nerfstudio's Viewer for the finished ``ag2_run`` pipeline on 127.0.0.1 (a free port), with a QueryPanel
    and ViewerControl set on the model before the Viewer is built (as the model's populate_modules would)."""
    from nerfstudio.viewer.viewer import Viewer
    from nerfstudio.viewer.viewer_elements import ViewerControl

    from gsstudio_ext.viewer.model_actions import model_actions
    from gsstudio_ext.viewer.query_panel import QueryPanel

    trainer, config_path = ag2_run
    config = trainer.config
    pipeline = trainer.pipeline
    model = pipeline.model
    state = model.query_state
    saved = (state.selection, state.relevancy, list(state.history), model.config.query.mode, model.training)
    attached = not hasattr(model, "query_panel")
    if attached:  # the lead wires the panel into the model; until then attach it here
        model.viewer_control = ViewerControl()
        model.query_panel = QueryPanel(
            model_actions(model, export=write_selection(model)),
            model.viewer_control,
            threshold=model.config.text_query_settings.threshold,
            mode=model.config.query.mode,
        )
    viewer_config = config.viewer
    viewer_config.websocket_host, viewer_config.websocket_port = "127.0.0.1", free_port()
    run_dir = Path(config_path).parent
    viewer = Viewer(
        viewer_config,
        log_filename=run_dir / viewer_config.relative_log_filename,
        datapath=config.pipeline.datamanager.data,
        pipeline=pipeline,
        trainer=trainer,
        train_lock=threading.Lock(),
    )
    try:
        url = f"http://127.0.0.1:{viewer_config.websocket_port}"
        yield ViewerRun(viewer, model, model.query_panel, url, run_dir, pipeline)
    finally:
        for machine in list(viewer.render_statemachines.values()):
            machine.running = False
        viewer.viser_server.stop()
        shutil.rmtree(run_dir / "exports", ignore_errors=True)
        if attached:
            del model.query_panel, model.viewer_control
        state.selection, state.relevancy, state.history = saved[0], saved[1], saved[2]
        model.config.query.mode = saved[3]
        model.train(saved[4])


def show_eval_view(run: ViewerRun) -> None:
    """Point every connected client's camera like the first held-out view (all six objects in sight)."""
    import viser.transforms as vtf
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    camera, _ = run.pipeline.datamanager.fixed_indices_eval_dataloader[0]
    c2w = camera.camera_to_worlds[0].cpu().numpy()
    rotation = vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)  # OpenGL -> viser camera axes
    fov = float(2 * np.arctan(float(camera.cy[0]) / float(camera.fy[0])))
    for client in run.viewer.viser_server.get_clients().values():
        with client.atomic():
            client.camera.fov = fov
            client.camera.wxyz = rotation.wxyz
            client.camera.position = c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO


def count_frames(run: ViewerRun) -> None:
    """Record every image the viewer sends to a connected client (a test-side wrapper on the client's scene API),
    so tests wait for renders instead of sleeping."""
    for client in run.viewer.viser_server.get_clients().values():
        send = client.scene.set_background_image

        def recorded(image, *args, send=send, **kwargs):
            send(image, *args, **kwargs)
            run.frames.append((time.monotonic(), int(image.shape[0]), int(image.shape[1])))

        client.scene.set_background_image = recorded


@pytest.fixture(scope="module")
def browser_page(ag2_viewer: ViewerRun) -> Iterator[Any]:
    """A headless Chromium page (software WebGL) showing the viewer, once the panel and a first image are there."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set GSSTUDIO_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    def local_only(route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.route("**/*", local_only)
        page.goto(ag2_viewer.url)
        page.get_by_text("Select by click").wait_for(timeout=60_000)
        count_frames(ag2_viewer)
        show_eval_view(ag2_viewer)
        try:
            yield page
        finally:
            browser.close()
    # the viewer's render thread for this client stops on disconnect
    deadline = time.monotonic() + 10
    while ag2_viewer.viewer.render_statemachines and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], np.ndarray]:
    """save(page, name) -> RGB array: a page screenshot saved in the pytest tmp dir and copied to /tmp/viewer_shots."""
    folder = tmp_path_factory.mktemp("viewer_shots")
    SHOTS.mkdir(parents=True, exist_ok=True)

    def save(page: Any, name: str) -> np.ndarray:
        from PIL import Image

        path = folder / f"{name}.png"
        page.screenshot(path=str(path))
        shutil.copyfile(path, SHOTS / path.name)
        return np.asarray(Image.open(path).convert("RGB"))

    return save
