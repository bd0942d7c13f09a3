"""A real `clisc serve` process on 127.0.0.1 for tests and benchmarks: started, waited for, stopped or killed.

`ServerProcess` runs ``python Testing/tiny_server.py OPTIONS`` (the server with the tiny SAMs) or
``python -m clisc serve OPTIONS``, on a free port (``--port 0``), with its log (stdout and stderr) in a file, and
reads the address from its "listening on" line.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from clisc.server.command import READY

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 180  # torch's import and the tiny SAMs' construction, on a loaded 2-core machine


class ServerProcess:
    def __init__(self, options: list, log: Path, cli: bool = False, env: Optional[dict] = None) -> None:
        self.log = Path(log)
        entry = ["-m", "clisc", "serve"] if cli else [str(ROOT / "Testing" / "tiny_server.py")]
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(
            os.pathsep) if p])
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen([sys.executable, *entry, "--port", "0", *map(str, options)], cwd=ROOT,
                                            stdout=output, stderr=subprocess.STDOUT, env=environment,
                                            start_new_session=True)
        self.url = self._wait_until_listening()

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def _wait_until_listening(self) -> Optional[str]:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            match = re.search(re.escape(READY) + r" (\S+)", self.text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                return None  # it exited: the caller reads why in the log
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not start in {START_SECONDS} s:\n{self.text()[-3000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (what a service manager sends), then wait: its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def rss_mib(self) -> float:
        """The server's resident memory (Linux)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
