"""The one progress protocol of the engine: a callback and a cancellation token.

Long work calls ``progress(stage, done, total, message, **fields)`` and checks ``cancel.raise_if_cancelled()``
between units of work (slices, cases, epochs). ``message`` is for people; ``fields`` carry the same facts for
programs, by name: ``case`` (a case id), ``epoch`` (1-based, = done in a training loop) and ``loss`` (a float).
Every callback accepts any fields. The CLI renders the callback as a tqdm bar, Slicer as a QProgressBar,
a subprocess as JSON lines.
"""
from __future__ import annotations

import threading
from typing import Optional, Protocol

from .errors import Cancelled


class ProgressCallback(Protocol):
    """``progress(stage, done, total, message="", **fields)``: ``done`` of ``total`` units of ``stage``."""

    def __call__(self, stage: str, done: int, total: int, message: str = "", **fields) -> None: ...


def no_progress(stage: str, done: int, total: int, message: str = "", **fields) -> None:
    """A progress callback that does nothing."""


class CancelToken:
    """Thread-safe flag that a GUI or signal handler sets and the engine polls between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user; nothing was written")


class TqdmProgress:
    """Progress callback that draws one tqdm bar per stage (on stderr)."""

    def __init__(self, disable: bool = False) -> None:
        self._bar = None
        self._stage: Optional[str] = None
        self._disable = disable

    def __call__(self, stage: str, done: int, total: int, message: str = "", **fields) -> None:
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=stage, leave=False, disable=self._disable, **_units(stage))
        bar = self._bar
        bar.total = total
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None


def _units(stage: str) -> dict:
    """tqdm's units for a stage: bytes, in KiB, MiB, GiB, for a download (`clisc.models.download` names its stage
    "download FILE"); plain counts otherwise."""
    return {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if stage.startswith("download ") else {"unit": ""}
