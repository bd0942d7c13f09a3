"""`Server`: what one running `clisc serve` holds (settings, models, sessions, job queue, temporary folder)."""
from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .jobs import Job, JobQueue
from .models import ModelRegistry
from .sessions import Session, SessionStore

logger = logging.getLogger("clisc.server")


@dataclass
class ServerSettings:
    """A server's limits. ``api_key``: None for a server on localhost only (`clisc serve` enforces that)."""

    api_key: Optional[str] = None
    devices: Sequence[str] = ("cpu",)
    max_upload_mb: float = 1024.0     # the compressed upload
    max_volume_mb: float = 4096.0     # its voxels once decompressed
    max_queued: int = 32
    max_sessions: int = 16
    session_timeout_s: float = 1800.0
    temp_dir: Optional[str] = None    # where uploads are spooled (a folder of its own is made inside)
    shutdown_timeout_s: float = 30.0


class Server:
    """What one running server holds: its settings, models, sessions, job queue and temporary folder."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry) -> None:
        self.settings, self.registry = settings, registry
        self.temp_dir = Path(tempfile.mkdtemp(prefix="clisc-serve-", dir=settings.temp_dir))
        self.sessions = SessionStore(settings.max_sessions, settings.session_timeout_s)
        self.queue = JobQueue(list(settings.devices), settings.max_queued)
        self._devices = itertools.cycle(settings.devices)  # where the next session refines
        self._closing = threading.Event()
        self._janitor = threading.Thread(target=self._drop_idle_sessions, name="clisc session janitor", daemon=True)
        self._janitor.start()

    def submit(self, session: Session, kind: str, work, pinned: bool = False) -> dict:
        """Queue ``work(device, progress, cancel)`` on ``session`` (``pinned``: on the device of its refiners)."""
        if pinned and session.device is None:
            session.device = next(self._devices)
        job = Job(kind, session.id, work, session.device if pinned else None)
        self.queue.submit(job)
        self.sessions.add_job(session, job)
        return {"job": job.id, "queue_position": self.queue.position(job)}

    def close_session(self, session_id: str) -> bool:
        session = self.sessions.close(session_id)
        for job in session.jobs.values() if session else ():
            self.queue.cancel(job)
        return session is not None

    def _drop_idle_sessions(self) -> None:
        while not self._closing.wait(min(30.0, self.settings.session_timeout_s / 4)):
            for session in self.sessions.idle():
                logger.info("session %s dropped after %.0f s idle", session.id, self.settings.session_timeout_s)
                for job in session.jobs.values():
                    self.queue.cancel(job)

    def close(self) -> None:
        """Cancel every job, stop the workers, remove the temporary folder."""
        self._closing.set()
        jobs = self.sessions.all_jobs()
        running = sum(job.state == "running" for job in jobs)
        logger.info("shutting down: cancelling %d job(s), %d running", len(jobs), running)
        self.queue.shutdown(jobs, self.settings.shutdown_timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
