"""Browser-test fixtures: nerfstudio's viser viewer for a trained run's pipeline on a free 127.0.0.1 port, with
the model's query panel, and a headless Debian Chromium (software WebGL) driven by Playwright.

No browser is downloaded: Playwright drives the system binary. Requests that do not go to 127.0.0.1 are aborted
in the page (the viewer's title bar links to nerf.studio images), so the tests never touch a network.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def open_viewer(trainer: Any, config_path: Path) -> Iterator[ViewerRun]:
    """nerfstudio's Viewer for a finished run's pipeline on 127.0.0.1 (a free port); the model's own query panel
    and ViewerControl are found by the Viewer. The model's query state and mode (if any) are restored afterwards."""
    from nerfstudio.viewer.viewer import Viewer

    config = trainer.config
    pipeline = trainer.pipeline
    model = pipeline.model
    state = getattr(model, "query_state", None)
    saved = (
        None
        if state is None
        else (state.selection, state.relevancy, state.query, list(state.history), model.config.query.mode)
    )
    was_training = model.training
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
        panel = getattr(model, "query_panel", None) or getattr(model, "semantic_panel", None)
        yield ViewerRun(viewer, model, panel, url, run_dir, pipeline)
    finally:
        for machine in list(viewer.render_statemachines.values()):
            machine.running = False
        viewer.viser_server.stop()
        shutil.rmtree(run_dir / "exports", ignore_errors=True)
        if state is not None:
            state.selection, state.relevancy, state.query, state.history = saved[0], saved[1], saved[2], saved[3]
            model.config.query.mode = saved[4]
        model.train(was_training)


@pytest.fixture(scope="module")
def ag2_viewer(ag2_run) -> Iterator[ViewerRun]:
    """The viewer of the shared ag2aussian-ext run."""
    with open_viewer(*ag2_run) as run:
        yield run


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


@contextlib.contextmanager
def open_page(run: ViewerRun, ready_label: str = "Threshold") -> Iterator[Any]:
    """A headless Chromium page (software WebGL) showing the viewer, once the panel (its ``ready_label``) is there;
    the client's camera is set to the first held-out view."""
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
        page.goto(run.url)
        page.get_by_text(ready_label, exact=True).first.wait_for(timeout=60_000)
        count_frames(run)
        show_eval_view(run)
        try:
            yield page
        finally:
            browser.close()
    # the viewer's render thread for this client stops on disconnect
    deadline = time.monotonic() + 10
    while run.viewer.render_statemachines and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser_page(ag2_viewer: ViewerRun) -> Iterator[Any]:
    with open_page(ag2_viewer, "Select by click") as page:
        yield page


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
