"""The explorer notebook in a real browser: JupyterLab on 127.0.0.1, headless Chromium driven by Playwright.

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``); Playwright only drives it
(``executable_path``), it never downloads a browser. The notebook runs from a temporary copy, so
the committed one is not touched; the kernel reads the bundled model and the key statistics from
the shared cache (``MEMIT_LAB_CACHE``). The server, its kernels and the browser are stopped when the
test ends, pass or fail. The screenshot lands in ``artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memit_lab.cache import cache_root

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "08_explore.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
INSTALL = (
    "`make install` sets up both (Debian's `chromium` package through apt-get, Playwright from the dev "
    "dependencies); by hand: `apt-get install -y --no-install-recommends chromium` and `.venv/bin/pip install -e "
    "'.[dev]'` (no `playwright install`: the system Chromium is used)"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# JupyterLab user settings: render every cell (no virtual scrolling), no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}
MINUTE = 60_000  # Playwright timeouts are in milliseconds
# The waits' limits are ~4x what a quiet 2-core machine needs; a slower (shared) machine can stretch them.
SLOWDOWN = float(os.environ.get("MEMIT_LAB_BROWSER_SLOWDOWN", "1"))


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab server: where to reach it, where it writes its log, when it was started."""

    url: str
    token: str
    root: Path
    log: Path
    started: float  # time.monotonic()

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"{self.url}{path}", method=method)
        request.add_header("Authorization", f"token {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(lab: Lab, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{lab.log.read_text()[-3000:]}")
        try:
            lab.api("/api/status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"JupyterLab did not answer within {seconds} s:\n{lab.log.read_text()[-3000:]}")


def _stop(lab: Lab, process: subprocess.Popen[bytes]) -> None:
    """Shut the server down through its API (it stops its kernels), then make sure it is gone."""
    if process.poll() is None:
        # If the server is already going, the signals below finish the job.
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            lab.api("/api/shutdown", method="POST")
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def jupyter_lab(root: Path, home: Path) -> Iterator[Lab]:
    """JupyterLab serving ``root`` on a free loopback port, with a token and private settings under ``home``."""
    settings = home / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "MEMIT_LAB_CACHE": str(cache_root()),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Nothing read from or written to the user's own Jupyter set-up.
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",  # CI runs as root
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=None",
    ]
    lab = Lab(f"http://127.0.0.1:{port}", token, root, home / "lab.log", time.monotonic())
    with lab.log.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(lab, process, seconds=60)
        yield lab
    finally:
        _stop(lab, process)


@contextmanager
def chromium_page(user_data: Path) -> Iterator[Any]:
    """A page of Debian's headless Chromium with a fresh profile, driven by Playwright."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright is not installed: {INSTALL}")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    with jupyter_lab(root, tmp_path) as server:
        yield server


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    with chromium_page(tmp_path / "chromium-profile") as browser_page:
        yield browser_page


def _number(page: Any, css_class: str) -> float:
    text = page.locator(f".{css_class}").first.inner_text()
    match = re.search(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", text)
    assert match, f"no number shown in .{css_class}: {text!r}"
    return float(match.group())


# Where the notebook stands, for failure messages: cells still queued or running, and the kernel's state.
_NOTEBOOK_STATE = """() => {
    const cells = [...document.querySelectorAll('.jp-CodeCell')];
    const busy = cells.filter(c => (c.querySelector('.jp-InputArea-prompt')?.textContent || '').includes('*'));
    const first = busy.map(c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').trim().slice(0, 80));
    const status = document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status');
    return `${cells.length} code cells, ${busy.length} queued or running (first: ${JSON.stringify(first[0] || '')}); `
        + `kernel ${status}`;
}"""


def _wait(lab: Lab, page: Any, what: str, js: str, minutes: float) -> None:
    """Wait until ``js`` is true in the page; past ``minutes``, fail saying what was awaited and where things stand."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    minutes *= SLOWDOWN
    try:
        page.wait_for_function(js, timeout=minutes * MINUTE, polling=500)
        return
    except PlaywrightTimeout:
        pass  # fail below, outside the handler: Playwright's own traceback says nothing more
    state = page.evaluate(_NOTEBOOK_STATE)
    log = lab.log.read_text(errors="replace")[-2000:]
    pytest.fail(
        f"{what}: not done after {minutes:g} min (on a slow machine set MEMIT_LAB_BROWSER_SLOWDOWN=2). "
        f"Notebook: {state}.\nJupyterLab log (end):\n{log}"
    )


def _wait_for_kernel_start(lab: Lab, page: Any, minutes: float = 2) -> None:
    """The notebook's kernel is up (the server says so) and the page shows it idle."""
    deadline = time.monotonic() + minutes * 60 * SLOWDOWN
    while not any(k["execution_state"] == "idle" for k in lab.api("/api/kernels")):
        if time.monotonic() > deadline:
            pytest.fail(f"no kernel became idle within {minutes:g} min:\n{lab.log.read_text()[-3000:]}")
        time.sleep(0.3)
    _wait(
        lab,
        page,
        "the page showing the kernel idle",
        "() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') === 'idle'",
        minutes,
    )


def _run_all_cells(lab: Lab, page: Any, minutes: float) -> None:
    """Run > Run All Cells, then wait until every code cell shows ``[n]`` and the kernel is idle."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile("^Run All Cells")).click()
    _wait(
        lab,
        page,
        "running all cells",
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
            const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
            const idle = !status || status.getAttribute('data-status') === 'idle';
            return prompts.length > 0 && prompts.every(p => !p.includes('*') && /\\[\\d+\\]/.test(p)) && idle;
        }""",
        minutes,
    )
    tracebacks = page.locator(".jp-OutputArea-output").filter(has_text="Traceback (most recent call last)")
    assert tracebacks.count() == 0, "a cell raised:\n" + tracebacks.first.inner_text()[-2000:]


def _label_test(css_class: str, pattern: str) -> str:
    """A JavaScript test: the text of the label ``css_class`` matches the regular expression ``pattern``."""
    return f"/{pattern}/.test(document.querySelector('.{css_class}')?.textContent || '')"


def _press_and_wait(lab: Lab, page: Any, button: str, done: str, minutes: float) -> None:
    """Click the playground's ``button``; wait until ``done`` (JavaScript) or a message shows; fail on a message."""
    page.locator(button).first.click()
    messages = "document.querySelector('.memit-message-error, .memit-message-info') !== null"
    _wait(lab, page, f"the result of clicking {button}", f"() => ({done}) || {messages}", minutes)
    message = page.locator(".memit-message-error, .memit-message-info")
    assert message.count() == 0, f"{button} answered with a message: {message.first.inner_text()}"


def edit_and_undo(lab: Lab, page: Any, notebook: str, new_object: str = "Rome") -> tuple[float, float, float]:
    """Open ``notebook``, run all cells, edit the first fact to ``new_object``, undo; P(new) before, after, now.

    The limits are generous (a cold cache makes the kernel convert the model and compute its
    statistics first) but bounded, so a hang fails in minutes, not hours.
    """
    page.set_default_timeout(MINUTE * SLOWDOWN)
    page.goto(f"{lab.url}/lab/tree/{notebook}?token={lab.token}")
    page.locator(".jp-Notebook").wait_for()
    _wait_for_kernel_start(lab, page)
    _run_all_cells(lab, page, minutes=10)

    field = page.locator(".memit-new-object input").first
    field.scroll_into_view_if_needed()
    field.fill(new_object)
    _press_and_wait(lab, page, ".memit-edit-button", _label_test("memit-p-after", r"\d"), minutes=5)
    before, after = _number(page, "memit-p-before"), _number(page, "memit-p-after")
    page.locator(".memit-p-after").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "08_explore-edited.png"))

    _press_and_wait(lab, page, ".memit-undo-button", _label_test("memit-p-now", "undone"), minutes=2)
    now = _number(page, "memit-p-now")
    page.screenshot(path=str(ARTIFACTS / "08_explore.png"))
    return before, after, now


def test_edit_and_undo_in_a_real_browser(lab: Lab, page: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        before, after, now = edit_and_undo(lab, page, NOTEBOOK.name)
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / "08_explore-failure.png"), full_page=True)
        shutil.copy(lab.log, ARTIFACTS / "jupyterlab-failure.log")
        raise
    finally:
        (ARTIFACTS / "run_seconds.txt").write_text(f"{time.monotonic() - lab.started:.1f}\n")
    assert after > before, f"P(new object) did not rise with the edit: before {before}, after {after}"
    assert now == before, f"after Undo, P(new object) is {now}, not {before} as before the edit"
