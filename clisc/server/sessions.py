"""Sessions: an uploaded volume kept on the server with its jobs and its refiners.

A client uploads a volume once; segmenting, applying a trained run, refining and propagating then name the
session. Its `clisc.refine.Refiner`s (one per slice axis) keep SAM's last logits, and their embeddings live in the
device's `clisc.refine.EmbeddingCache`, so a click on a slice already embedded costs only SAM's decoder, as it
does locally. A session is closed by its client, or dropped after ``idle_seconds`` without a request; its jobs are
cancelled and their results freed with it. A session keeps the results of its last `ENDED_JOBS_KEPT` ended jobs (a
client fetches a result as soon as its job ends), so a long session of clicks does not grow without bound.
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Dict, List, Optional

from ..volume import Volume
from .jobs import ENDED, Job

ENDED_JOBS_KEPT = 16


class SessionLimit(RuntimeError):
    """The server holds its maximum of sessions."""


class Session:
    """One client's volume on the server. ``device``: where its refiners live once it has refined (its
    refinements then run there); ``jobs``: its jobs by id."""

    def __init__(self, volume: Volume) -> None:
        self.id = secrets.token_urlsafe(12)
        self.volume = volume
        self.device: Optional[str] = None
        self.jobs: Dict[str, Job] = {}
        self.last_used = time.monotonic()
        self._refiners: Dict[int, object] = {}  # slice axis -> Refiner

    def refiner(self, segmenter, axis: int, cache):
        """The session's `clisc.refine.Refiner` along ``axis`` with ``segmenter`` (a new one when the device's
        refinement SAM changed: the old one's logits belong to another model)."""
        kept = self._refiners.get(axis)
        if kept is None or kept.segmenter is not segmenter:
            from ..refine import Refiner

            kept = self._refiners[axis] = Refiner(segmenter, self.volume, axis, cache=cache)
        return kept


class SessionStore:
    """The open sessions, at most ``max_sessions``, each dropped after ``idle_seconds`` without a request."""

    def __init__(self, max_sessions: int, idle_seconds: float) -> None:
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self._sessions: Dict[str, Session] = {}
        self._jobs: Dict[str, Job] = {}
        self._lock = threading.Lock()

    def open(self, volume: Volume) -> Session:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimit(f"the server holds its maximum of {self.max_sessions} sessions: close one (or "
                                   f"wait: an idle session is dropped after {self.idle_seconds / 60:.0f} minutes)")
            session = Session(volume)
            self._sessions[session.id] = session
            return session

    def get(self, session_id: str) -> Session:
        """The session; KeyError when there is none of that id (closed, expired, or never opened)."""
        with self._lock:
            session = self._sessions[session_id]
            session.last_used = time.monotonic()
            return session

    def add_job(self, session: Session, job: Job) -> None:
        with self._lock:
            ended = [old for old in session.jobs.values() if old.state in ENDED]
            for old in ended[:max(0, len(ended) - ENDED_JOBS_KEPT + 1)]:
                del session.jobs[old.id], self._jobs[old.id]
            session.jobs[job.id] = job
            self._jobs[job.id] = job

    def job(self, job_id: str) -> Job:
        """The job; KeyError when there is none of that id. Its session counts as used."""
        with self._lock:
            job = self._jobs[job_id]
            session = self._sessions.get(job.session)
            if session is not None:
                session.last_used = time.monotonic()
            return job

    def close(self, session_id: str) -> Optional[Session]:
        """Remove the session and its jobs (the caller cancels them); None when there was none."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            for job_id in session.jobs if session else ():
                self._jobs.pop(job_id, None)
            return session

    def idle(self) -> List[Session]:
        """Remove and return the sessions unused for ``idle_seconds``."""
        now = time.monotonic()
        with self._lock:
            expired = [s.id for s in self._sessions.values() if now - s.last_used > self.idle_seconds]
        return [session for session in map(self.close, expired) if session is not None]

    def all_jobs(self) -> List[Job]:
        with self._lock:
            return list(self._jobs.values())

    def __len__(self) -> int:
        return len(self._sessions)
