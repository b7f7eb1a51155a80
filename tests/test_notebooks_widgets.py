"""Notebook 01 after Run All: its widget still redraws, and every figure the notebook draws is displayed.

A library call that switched matplotlib's backend inside the user's kernel (``matplotlib.use("Agg")``) once made
the widget draw nothing after Run All and hid the ``cauchy2`` theory plot. Two checks of the same thing:

- through a kernel (nbclient): Run All on smoke settings, then a cell that sets the widget's ``tau`` as a user
  would; the widget's output must then hold one new image;
- in a real browser where Chromium is installed (JupyterLab in headless Chromium, driven over the DevTools
  protocol): Run All, then pick another gate family in the widget's dropdown; a new image must be shown.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_gates.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDGET_CELL = 5  # the explore_gate widget: an HBox of controls, then the interactive output
THEORY_CELL = 15  # the cauchy2 theory plot


def images(outputs: list) -> list[str]:
    """The PNGs among notebook outputs."""
    return [o["data"]["image/png"] for o in outputs if o.get("output_type") == "display_data"
            and "image/png" in o.get("data", {})]


@pytest.mark.slow
def test_notebook_01_widget_redraws_after_run_all(monkeypatch):
    from nbrun import SlicedPollClient

    monkeypatch.setenv("SSPO_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # 120 s a cell (each takes under 20 s); SlicedPollClient: see tests/nbrun.py
    client = SlicedPollClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    with client.setup_kernel():
        for index, cell in enumerate(list(nb.cells)):
            client.execute_cell(cell, index)
        view = nb.cells[WIDGET_CELL].outputs[1]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        before = images(client.widget_state[view]["outputs"])
        change = nbformat.v4.new_code_cell("controls['tau'].value = 2.0  # what moving the slider does")
        nb.cells.append(change)
        client.execute_cell(change, len(nb.cells) - 1)
        after = images(client.widget_state[view]["outputs"])
    assert len(before) == 1, "Run All drew no figure in the widget"
    assert len(after) == 1 and after != before, "changing the widget after Run All displayed no new figure"
    assert len(images(nb.cells[THEORY_CELL].outputs)) == 1, "the cauchy2 theory plot is not displayed"


# --------------------------------------------------------------------------- the same in a real browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float, what: str):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


class Page:
    """One browser tab over the Chrome DevTools protocol (tornado's websocket client: no extra package)."""

    def __init__(self, ws_url: str) -> None:
        from tornado.websocket import websocket_connect

        self.loop = asyncio.new_event_loop()
        self.conn = self.run(lambda: websocket_connect(ws_url, max_message_size=2**28))
        self.next_id = 0

    def run(self, start, timeout: float = 60) -> object:
        """Run ``start()`` (which returns an awaitable: made inside the loop it belongs to) to its end."""

        async def wrapped():
            return await asyncio.wait_for(start(), timeout)

        return self.loop.run_until_complete(wrapped())

    def js(self, expression: str, timeout: float = 120) -> object:
        """The value of ``expression`` (promises awaited) in the page."""
        self.next_id += 1
        message = {"id": self.next_id, "method": "Runtime.evaluate",
                   "params": {"expression": expression, "awaitPromise": True, "returnByValue": True}}
        self.run(lambda: self.conn.write_message(json.dumps(message)))
        while True:
            reply = json.loads(self.run(self.conn.read_message, timeout))
            if reply.get("id") == self.next_id:
                result = reply["result"]
                if "exceptionDetails" in result:
                    raise AssertionError(f"page error: {result['exceptionDetails']}")
                return result["result"].get("value")

    def close(self) -> None:
        self.conn.close()
        self.loop.close()


WIDGET_IMAGES = ("Array.from(document.querySelectorAll('.jp-Notebook .widget-output img, "
                 ".jp-Notebook .jupyter-widgets-output-area img')).map(i => i.src)")
ALL_RUN = ("(() => { const nb = jupyterapp.shell.currentWidget; if (!nb || !nb.content) return false;"
           " const cells = nb.content.widgets.filter(c => c.model.type === 'code');"
           " return nb.sessionContext.session?.kernel?.status === 'idle'"
           " && cells.every(c => c.model.executionCount !== null); })()")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of notebook 01, with the app exposed to the page (for Run All)."""
    port, token = free_port(), "sspo-test"
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    env = {**os.environ, "SSPO_QUICK": "1", "PYTHONPATH": str(ROOT), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
                             "--ServerApp.allow_root=True"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _answers(port) or _died(proc, tmp_path / "lab.log"), 120, "JupyterLab to start")
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _died(proc: subprocess.Popen, log: Path) -> bool:
    """False while ``proc`` runs; a test failure showing the end of its log once it has exited."""
    if proc.poll() is None:
        return False
    pytest.fail(f"JupyterLab exited ({proc.returncode}): {log.read_text()[-2000:]}")


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def page(lab, tmp_path):
    """Headless Chromium showing notebook 01 in JupyterLab."""
    import urllib.request

    profile = tmp_path / "chromium"
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000",
                             lab], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        port = wait_for(lambda: active.exists() and active.read_text().split("\n")[0], 60, "Chromium's debug port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as reply:
            tab = next(t for t in json.load(reply) if t["type"] == "page")
        browser = Page(tab["webSocketDebuggerUrl"])
        yield browser
        browser.close()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (the kernel check above runs everywhere)")
def test_notebook_01_widget_redraws_after_run_all_in_jupyterlab(page):
    wait_for(lambda: page.js("typeof jupyterapp !== 'undefined' && !!jupyterapp.shell.currentWidget?.content"
                             " && jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'"),
             180, "the notebook and its kernel in JupyterLab")
    page.js("jupyterapp.commands.execute('notebook:run-all-cells').then(() => true)", timeout=400)
    wait_for(lambda: page.js(ALL_RUN), 400, "Run All to finish")
    before = wait_for(lambda: page.js(WIDGET_IMAGES), 60, "the widget's figure after Run All")
    # Pick another family in the dropdown, as a user would: the widget's view listens for the change event.
    changed = page.js("(() => { const s = document.querySelector('.jp-Notebook .widget-dropdown select');"
                      " const i = s ? Array.from(s.options).findIndex(o => o.textContent === 'erf') : -1;"
                      " if (i < 0) return false; s.selectedIndex = i;"
                      " s.dispatchEvent(new Event('change', {bubbles: true})); return true; })()")
    assert changed, "no dropdown in the widget"
    after = wait_for(lambda: (lambda now: now if now and now != before else None)(page.js(WIDGET_IMAGES)), 120,
                     "a new figure in the widget after changing the dropdown")
    assert len(after) == 1
    theory = page.js(f"(() => {{ const c = jupyterapp.shell.currentWidget.content.widgets[{THEORY_CELL}];"
                     " return c.node.querySelectorAll('.jp-OutputArea-output img').length; })()")
    assert theory == 1, "the cauchy2 theory plot is not shown"
