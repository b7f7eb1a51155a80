"""Where a study's runs execute: the local process pool (the default, nothing to install) or Ray (the ``ray``
extra: a local instance, or the cluster ``ray.init`` finds through ``RAY_ADDRESS``), behind one interface.

Both give ``submit(fn, *args) -> concurrent.futures.Future``, so the study's loop is the same for both: a run
directory is the unit of work, finished runs are reused, a crashed run writes ``FAILED`` and the others go on.
A local worker imports torch and transformers once and runs many runs. Under Ray, a task whose worker dies is
retried (:data:`RAY_RETRIES` times) and its run resumes from its last checkpoint. On a cluster every node needs
the package installed (``pip install -e .`` of the same checkout) and the output directory on a shared file
system.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

EXECUTORS = ("local", "ray")
RAY_RETRIES = 3
"""Times Ray runs a task again when its worker process dies (a killed worker, a lost node)."""
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
"""Environment of a worker: no transformers chatter (the parent reports progress)."""


def quiet_worker() -> None:
    """Initialiser of a local job process: no transformers chatter or progress bars (the parent reports)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class LocalPool:
    """``jobs`` spawned processes on this machine, one torch thread each (the runs set ``threads = 1``)."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=quiet_worker)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayPool:
    """Ray tasks of one CPU each: on a local instance of ``jobs`` CPUs started here, or on the cluster named by
    ``RAY_ADDRESS`` (``auto`` for the one ``ray start`` runs on this node)."""

    def __init__(self, jobs: int) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--executor: 'ray' needs the ray extra (pip install -e '.[ray]'); allowed: "
                             f"{', '.join(EXECUTORS)}") from None
        self.ray = ray
        address = os.environ.get("RAY_ADDRESS")
        resources = {} if address else {"num_cpus": jobs}
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, runtime_env={"env_vars": QUIET}, log_to_driver=False,
                     include_dashboard=False, **resources)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        task = self.ray.remote(num_cpus=1, max_retries=RAY_RETRIES, retry_exceptions=False)(fn)
        return task.remote(*args).future()

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()


def open_pool(executor: str, jobs: int) -> LocalPool | RayPool:
    """The pool named by ``executor`` (``--executor``); a ValueError naming the allowed values otherwise."""
    if executor not in EXECUTORS:
        raise ValueError(f"--executor: unknown value {executor!r}; allowed: {', '.join(EXECUTORS)}")
    return LocalPool(jobs) if executor == "local" else RayPool(jobs)
