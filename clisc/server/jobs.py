"""The server's job queue: one job at a time per device, in the order they came, with queue positions.

A `Job` is engine work on one device: ``work(device, progress, cancel)`` returns its result. One worker thread per
device (``clisc serve --devices cuda:0,cuda:1``: two) takes the oldest queued job it may run: any job, except one
pinned to another device (a session's refinements stay where its SAM embeddings are). A job's state, its progress
(the engine's ``progress(stage, done, total, message, **fields)``) and its queue position are read at any time;
`Job.wait_for_change` lets a client's request wait for the next change instead of polling. Cancel sets the job's
`CancelToken`: a queued job ends at once, a running one at the engine's next check.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from typing import Callable, List, Optional

from ..errors import Cancelled, InputError
from ..progress import CancelToken

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)


class QueueFull(RuntimeError):
    """The queue holds its maximum of waiting jobs."""


class Job:
    """One piece of engine work and what a client may ask about it.

    Attributes:
        id: a random, unguessable identifier. kind: "segment", "apply", "refine" or "propagate".
        session: the id of the session it works on. device: the device it must run on (None: any).
        state: queued, running, done, failed or cancelled. error: what went wrong, in words (failed).
        error_kind: "input" (the request could not be run as asked) or "internal" (a fault of the server).
        progress: the engine's last report, as a dict (stage, done, total, message, fields).
        result: what ``work`` returned (done).
        version: bumped by every change, for `wait_for_change`.
    """

    def __init__(self, kind: str, session: str, work: Callable, device: Optional[str] = None) -> None:
        self.id = secrets.token_urlsafe(12)
        self.kind, self.session, self.work, self.device = kind, session, work, device
        self.token = CancelToken()
        self.state = QUEUED
        self.error: Optional[str] = None
        self.error_kind: Optional[str] = None
        self.progress = {"stage": "queued", "done": 0, "total": 0, "message": "", "fields": {}}
        self.result = None
        self.version = 0
        self._changed = threading.Condition()

    def report(self, stage: str, done: int, total: int, message: str = "", **fields) -> None:
        """The engine's progress callback."""
        self._update(progress={"stage": stage, "done": int(done), "total": int(total), "message": message,
                               "fields": {k: v for k, v in fields.items() if isinstance(v, (str, int, float))}})

    def _update(self, **values) -> None:
        with self._changed:
            for name, value in values.items():
                setattr(self, name, value)
            self.version += 1
            self._changed.notify_all()

    def wait_for_change(self, after: int, timeout: float) -> None:
        """Return once ``version`` is past ``after``, or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.version > after, timeout)

    def run(self, device: str) -> None:
        """Run ``work`` on ``device`` (a worker thread) and record how it ended."""
        if self.token.cancelled:
            self._update(state=CANCELLED)
            return
        self._update(state=RUNNING, progress=dict(self.progress, stage="starting"))
        started = time.perf_counter()
        try:
            result = self.work(device, self.report, self.token)
            self.token.raise_if_cancelled()  # cancelled after its last check: it returns nothing
        except Cancelled:
            self._update(state=CANCELLED)
        except InputError as error:
            self._update(state=FAILED, error=str(error), error_kind="input")
        except Exception as error:  # a fault of the server: logged with its traceback, said in one line
            logger.error("job %s (%s) failed:\n%s", self.id, self.kind, traceback.format_exc())
            self._update(state=FAILED, error=f"{type(error).__name__}: {error}", error_kind="internal")
        else:
            self._update(state=DONE, result=result)
        logger.info("job %s (%s) %s on %s in %.1f s", self.id, self.kind, self.state, device,
                    time.perf_counter() - started)

    def cancel(self) -> None:
        self.token.cancel()
        if self.state == QUEUED:
            self._update(state=CANCELLED)


class JobQueue:
    """Queued jobs and one worker thread per device.

    Args:
        devices: the devices ("cpu", "cuda:0", ...): one worker each, one job at a time each.
        max_queued: how many jobs may wait; `submit` raises QueueFull beyond that.
    """

    def __init__(self, devices: List[str], max_queued: int) -> None:
        self.devices, self.max_queued = list(devices), max_queued
        self._queued: List[Job] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, args=(device,), name=f"clisc job worker {device}",
                                          daemon=True) for device in self.devices]
        for worker in self._workers:
            worker.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queued) >= self.max_queued:
                raise QueueFull(f"the server's queue is full ({self.max_queued} jobs waiting): try again in a minute")
            self._queued.append(job)
            self._lock.notify_all()

    def position(self, job: Job) -> Optional[int]:
        """How many queued jobs will start before ``job`` (0: it is next); None when it is not queued."""
        with self._lock:
            return self._queued.index(job) if job in self._queued else None

    def queued(self) -> int:
        with self._lock:
            return len(self._queued)

    def cancel(self, job: Job) -> None:
        with self._lock:
            job.cancel()
            if job in self._queued:
                self._queued.remove(job)

    def _next(self, device: str) -> Optional[Job]:
        with self._lock:
            while not self._stopping:
                for job in self._queued:
                    if job.device in (None, device):
                        self._queued.remove(job)
                        job.device = device
                        return job
                self._lock.wait()
            return None

    def _work(self, device: str) -> None:
        while True:
            job = self._next(device)
            if job is None:
                return
            job.run(device)
            job.work = None  # its closure holds the request's arrays

    def shutdown(self, jobs: List[Job], timeout: float) -> None:
        """Cancel ``jobs`` (every job the server knows), stop the workers and wait for them at most ``timeout``
        seconds."""
        with self._lock:
            self._stopping = True
            for job in jobs:
                job.cancel()
            self._queued.clear()
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
