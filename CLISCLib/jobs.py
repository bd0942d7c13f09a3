"""Background jobs: long work off Slicer's main thread, one interface for a worker thread and for a process.

A job is made, started, then polled by the main thread (a Qt timer in a widget, `BackgroundJob.wait` in a
console call) until it is `finished`; it then holds its `result` or its `error`. What it runs never touches
MRML: the main thread copies what the work needs out of the scene before the start, and writes the result back
after the end (a `ThreadJob`'s ``finish`` step, which `poll` runs on the main thread).

- `ThreadJob`: an engine function on a worker thread (zero-shot segmentation, U-Net inference, weight downloads).
  Progress arrives through the engine's callback, cancel goes through its `clisc.progress.CancelToken`, and the
  engine's log records from that thread become the job's log.
- `ProcessJob`: a command in a process of its own process group (``python -m clisc train --json-progress``).
  Progress arrives as JSON lines on its stdout, its log is its stderr, and cancel ends the whole process tree.

Both report progress as `Progress`: the engine's ``progress(stage, done, total, message, **fields)`` call, or
its JSON line ``{"stage", "case", "epoch", "loss", "done", "total"}``, with the structured fields kept.
"""
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import slicer

POLL_SECONDS = 0.05  # how often `BackgroundJob.wait` looks for news


@dataclass(frozen=True)
class Progress:
    """One progress report: ``done`` of ``total`` units of ``stage``, a free ``message``, and the structured
    ``fields`` the engine sends (``case``, ``epoch``, ``loss``)."""

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    fields: dict = field(default_factory=dict)

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0

    def heading(self) -> str:
        """The stage and the count: "unet_round0 12/400"."""
        return f"{self.stage} {self.done}/{self.total}" if self.total else self.stage

    def details(self) -> str:
        """The message and the structured fields in words: "case pat0001, epoch 12, loss 0.3456"."""
        case, epoch, loss = (self.fields.get(name) for name in ("case", "epoch", "loss"))
        parts = [self.message or None, f"case {case}" if case else None,
                 f"epoch {epoch}" if epoch is not None else None, f"loss {loss:.4f}" if loss is not None else None]
        return ", ".join(part for part in parts if part)


Update = Union[Progress, str]  # what `BackgroundJob.poll` hands out: a progress report or a log line


class BackgroundJob:
    """What every job offers the main thread: `start`, `poll`, `finished`, `cancel`, `result` or `error`.

    Attributes:
        progress: the latest `Progress`.
        log: every log line so far.
        result: what the job made, once `finished` without error.
        error: the exception that ended it (`clisc.errors.Cancelled` when cancelled), once `finished`.
    """

    def __init__(self) -> None:
        self.progress = Progress("starting")
        self.log = []
        self.result = None
        self.error = None
        self._updates = queue.Queue()  # filled by the worker side, emptied by `poll` on the main thread
        self._finished = False

    def start(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Ask the job to stop; it ends with a `clisc.errors.Cancelled` error."""
        raise NotImplementedError

    @property
    def cancelled(self) -> bool:
        raise NotImplementedError

    def _ended(self) -> bool:
        """Whether the work has ended and all its output is in `_updates`."""
        raise NotImplementedError

    def _receive(self, item) -> Optional[Update]:
        """Turn an item the worker side queued into an update (None: nothing to hand out)."""
        return item

    def _conclude(self) -> None:
        """Set `result` or `error` once the work has ended (main thread)."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        """True once `poll` has seen the work end: `result` or `error` is then final."""
        return self._finished

    def poll(self) -> list:
        """Main thread: the updates that arrived since the last call, in order, each a `Progress` (also kept as
        `progress`) or a log line (also appended to `log`). When the work has ended, concludes the job."""
        ended = self._ended()  # before emptying the queue: what arrived before the end is all there is
        updates = []
        while True:
            try:
                item = self._updates.get_nowait()
            except queue.Empty:
                break
            update = self._receive(item)
            if isinstance(update, Progress):
                self.progress = update
            elif isinstance(update, str):
                self.log.append(update)
            else:
                continue
            updates.append(update)
        if ended and not self._finished:
            self._conclude()
            self._finished = True
        return updates

    def wait(self, timeout: Optional[float] = None, progress: Optional[Callable] = None,
             log: Optional[Callable] = None, idle: Optional[Callable] = None):
        """Block until the job has finished and return its result, or raise its error.

        Args:
            timeout: seconds; TimeoutError when the job is still running then (it keeps running).
            progress: called for each report as ``progress(stage, done, total, message, **fields)``.
            log: called with each log line.
            idle: called between polls; default: let Slicer process its events (so its GUI stays alive).
        """
        application = getattr(slicer, "app", None)  # absent outside the Slicer application
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for update in self.poll():
                if isinstance(update, Progress):
                    if progress is not None:
                        progress(update.stage, update.done, update.total, update.message, **update.fields)
                elif log is not None:
                    log(update)
            if self._finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the job is still running after {timeout} s")
            if idle is not None:
                idle()
            elif application is not None:
                application.processEvents()
            time.sleep(POLL_SECONDS)
        if self.error is not None:
            raise self.error
        return self.result


class ThreadJob(BackgroundJob):
    """``work(progress=..., cancel=...)`` on a worker thread, then ``finish(output)`` on the main thread.

    ``work`` gets the engine's progress callback and a `clisc.progress.CancelToken` (``token``, or a new one) and
    must not touch MRML; its return value, passed through ``finish`` if given (which may use MRML: `poll` calls
    it on the main thread), becomes `result`. Log records of the ``clisc`` loggers from the worker thread become
    log lines.
    """

    def __init__(self, work: Callable, finish: Optional[Callable] = None, token=None) -> None:
        from clisc.progress import CancelToken

        super().__init__()
        self._work, self._finish = work, finish
        self._token = token if token is not None else CancelToken()
        self._output = self._workError = None
        self._thread = threading.Thread(target=self._run, name="CLISC job", daemon=True)
        self._logHandler = _ThreadLogHandler(self._updates)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._token.cancel()

    @property
    def cancelled(self) -> bool:
        return self._token.cancelled

    def _report(self, stage: str, done: int, total: int, message: str = "", **fields) -> None:
        self._updates.put(Progress(stage, done, total, message, fields))

    def _run(self) -> None:
        self._logHandler.threadId = threading.get_ident()
        engineLogger = logging.getLogger("clisc")
        engineLogger.addHandler(self._logHandler)
        try:
            self._output = self._work(progress=self._report, cancel=self._token)
        except BaseException as error:  # handed to the main thread, which reports it
            self._workError = error
        finally:
            engineLogger.removeHandler(self._logHandler)

    def _ended(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def _conclude(self) -> None:
        if self._workError is not None:
            self.error = self._workError
            return
        try:
            self.result = self._output if self._finish is None else self._finish(self._output)
        except Exception as error:  # a failed write-back is the job's error, like a failed work step
            self.error = error


class _ThreadLogHandler(logging.Handler):
    """Queues the messages of log records made on one thread (the job's worker)."""

    def __init__(self, updates: queue.Queue) -> None:
        super().__init__()
        self.threadId = None
        self._updates = updates

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.threadId:
            message = record.getMessage()
            self._updates.put(f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING
                              else message)


class ProcessJob(BackgroundJob):
    """A command (an engine command line) in a background process of its own process group.

    Two reader threads queue its stdout and stderr lines. A JSON object on stdout is a progress event, kept in
    `events`; the event ``{"stage": "finished", ...}`` is the summary, which becomes `result` (without its
    ``stage``). Every other line is a log line. The job fails when the process exits with an error: `error` is
    then a RuntimeError with what the engine said (`errorMessage`).
    """

    def __init__(self, command: list, env: Optional[dict] = None) -> None:
        super().__init__()
        self.command = command
        self.env = env
        self.events = []     # every JSON object the process printed, in order
        self.process = None  # the subprocess.Popen, once started
        self._summary = None
        self._cancelRequested = False
        self._readers = []

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        encoding="utf-8", errors="replace", bufsize=1, env=self.env,
                                        **_ownProcessGroup())
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.process.stdout, self.process.stderr)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._updates.put(line.rstrip("\n"))
        stream.close()

    def _receive(self, line: str) -> Optional[Update]:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            self.events.append(event)
            if event.get("stage") == "finished":
                self._summary = {key: value for key, value in event.items() if key != "stage"}
                return None
            fields = {key: value for key, value in event.items() if key not in ("stage", "done", "total", "message")}
            return Progress(str(event.get("stage")), event.get("done") or 0, event.get("total") or 0,
                            event.get("message") or "", fields)
        return line if line.strip() else None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def _ended(self) -> bool:
        return self.returncode is not None and not any(reader.is_alive() for reader in self._readers)

    def errorMessage(self) -> str:
        """What the engine said went wrong (its "clisc: error: ..." line, else the end of its log)."""
        errors = [line for line in self.log if line.startswith("clisc: ")]
        return errors[-1][len("clisc: "):] if errors else "\n".join(self.log[-20:])

    def _conclude(self) -> None:
        from clisc.errors import Cancelled

        if self._cancelRequested:
            self.error = Cancelled("cancelled: the engine process was ended")
        elif self.returncode != 0:
            said = self.errorMessage()
            if self.returncode < 0:  # not by Cancel: the system ended it (out of memory, shutdown)
                said = f"the engine process was killed (signal {-self.returncode})" + (f": {said}" if said else "")
            self.error = RuntimeError(said or f"the engine process exited with code {self.returncode}")
        else:
            self.result = self._summary

    @property
    def cancelled(self) -> bool:
        return self._cancelRequested

    def cancel(self, grace: float = 5.0) -> None:
        """End the process and every process it started: SIGTERM to the group, SIGKILL after ``grace`` seconds
        (Windows: ``taskkill /T /F``). The engine writes every file atomically, so what is left in a run folder
        is whole files only; resuming the run continues from them."""
        if self.process is None or self.process.poll() is not None:
            return
        self._cancelRequested = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True)
        else:
            _signalGroup(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            _signalGroup(self.process.pid, signal.SIGKILL)  # also children that outlived the leader
        self.process.wait()


def _ownProcessGroup() -> dict:
    """Popen arguments that put the child in a new process group, so that cancel reaches its children too
    (and, on Windows, open no console window)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _signalGroup(groupId: int, signalNumber: int) -> None:
    try:
        os.killpg(groupId, signalNumber)
    except ProcessLookupError:
        pass


def pythonExecutable() -> str:
    """Slicer's Python interpreter (PythonSlicer, on Slicer's PATH), or this Python outside Slicer."""
    return shutil.which("PythonSlicer") or sys.executable


def engineEnvironment() -> dict:
    """This process's environment, with the folder holding the ``clisc`` package first on PYTHONPATH (Slicer
    finds it among its module paths, which a child Python does not know)."""
    spec = importlib.util.find_spec("clisc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLISC engine (Python package clisc) is not installed")
    root = str(Path(list(spec.submodule_search_locations)[0]).parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
