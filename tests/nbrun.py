"""Execute notebooks with nbclient, polling the kernel's replies in short slices.

nbclient 0.11 with pyzmq 27 sometimes misses the wake-up for a kernel's execute reply
(jupyter/nbclient#312): the kernel has finished and sits idle, and the client waits out the
cell's whole time limit before it reads the reply (seen here on notebook 01's widget cell, with
both processes idle). Polling the shell channel in :data:`POLL_S` slices reads the reply at once.

The notebook tests use :class:`SlicedPollClient`; ``.ci/notebooks.sh`` runs
``python tests/nbrun.py --out DIR NOTEBOOK ...`` in the ``[notebooks]`` environment, which has no pytest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.util import ensure_async

POLL_S = 0.25
"""The longest single wait on the kernel's shell channel (seconds)."""


def poll_in_slices(channel) -> None:
    """Make ``channel.get_msg(timeout=T)`` wait at most :data:`POLL_S` at a time, up to ``T`` in all."""
    wait_once = channel.get_msg

    async def get_msg(timeout: float | None = None, **kwargs):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                return await ensure_async(wait_once(timeout=left, **kwargs))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


class SlicedPollClient(NotebookClient):
    """A :class:`~nbclient.NotebookClient` whose kernel client polls its shell channel in slices."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        poll_in_slices(kc.shell_channel)
        return kc


def run(path: Path, timeout: float) -> nbformat.NotebookNode:
    """``path`` executed top to bottom in its own folder (a cell error raises)."""
    nb = nbformat.read(path, as_version=4)
    SlicedPollClient(nb, timeout=timeout, kernel_name="python3",
                     resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks; write the executed copies to --out.")
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a cell (default 180)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.notebooks:
        start = time.monotonic()
        nbformat.write(run(path, args.timeout), args.out / path.name)
        print(f"notebooks: {path} ran in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
