"""Download one file over HTTP(S) with resume, progress, cancellation and a sha256 check.

The bytes go to ``NAME.part`` next to the destination; only a file that passed the size and checksum
checks is moved onto the final name (atomically), so the cache never holds a half or corrupt file under
its real name. An interrupted or cancelled download keeps its ``.part`` and the next call resumes it.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..errors import Cancelled, InputError
from ..progress import CancelToken, ProgressCallback, no_progress

CHUNK_BYTES = 64 * 1024
PROGRESS_EVERY_BYTES = 1024 * 1024


class DownloadError(InputError):
    """The file could not be fetched: no network, a timeout, or an HTTP error."""


class ChecksumError(InputError):
    """The downloaded file does not have the expected size or sha256 (it has been deleted)."""


def download(
    url: str,
    destination: Path,
    sha256: Optional[str] = None,
    sha256_prefix: Optional[str] = None,
    size: Optional[int] = None,
    progress: ProgressCallback = no_progress,
    cancel: Optional[CancelToken] = None,
    timeout: float = 30,
    import_hint: Optional[str] = None,
) -> str:
    """Fetch ``url`` into ``destination`` and return the hex sha256 of the file.

    Args:
        url: http(s) address of the file.
        destination: final path; the parent folder is created. Bytes are streamed to ``destination.part``.
        sha256: expected hex digest of the whole file (checked when given).
        sha256_prefix: expected leading hex digits, checked only when ``sha256`` is not given.
        size: expected size in bytes (checked before the hash when given).
        progress: called as ``progress("download NAME", done_bytes, total_bytes, "")`` about every MB;
            ``total_bytes`` is 0 while the server has not told the size.
        cancel: polled between chunks; on cancel the ``.part`` is kept for a later resume.
        timeout: seconds to wait for the connection and for each read.
        import_hint: the exact command that imports a manually downloaded copy, shown when fetching fails.

    Raises:
        DownloadError: network failure (``.part`` kept) or HTTP error.
        ChecksumError: wrong size or hash (``.part`` deleted).
        Cancelled: ``cancel`` was set.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    stage = f"download {destination.name}"
    digest = hashlib.sha256()
    done = _hash_file(part, digest) if part.exists() else 0

    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if done and response.getcode() != 206:  # the server ignores Range: start over
                digest, done = hashlib.sha256(), 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length else (size or 0)
            progress(stage, done, total, "")
            reported = done
            with open(part, "ab" if done else "wb") as out:
                while True:
                    if cancel is not None and cancel.cancelled:
                        raise Cancelled(f"download of {url} cancelled; {part} is kept and the next download resumes it")
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if done - reported >= PROGRESS_EVERY_BYTES:
                        progress(stage, done, total, "")
                        reported = done
            if length and done < total:  # read() may return b"" on a dropped connection instead of raising
                raise ConnectionError(f"the connection closed after {done} of {total} bytes")
            if done != reported:
                progress(stage, done, max(total, done), "")
    except urllib.error.HTTPError as error:
        if error.code != 416 or not done:  # 416 after a resume: the .part holds the whole file; checked below
            raise DownloadError(f"could not download {url}: the server answered HTTP {error.code} ({error.reason}).") from error
    except (OSError, http.client.HTTPException) as error:  # URLError, DNS, refused, reset, timeout, cut short
        hint = import_hint or "clisc models import NAME FILE"
        raise DownloadError(
            f"could not fetch {url} ({getattr(error, 'reason', error)}). Check the network connection and run the "
            f"same command again to resume, or download {url} with a browser on another machine, copy the file "
            f"here and import it with: {hint}"
        ) from error

    actual = digest.hexdigest()
    problem = None
    if size is not None and done != size:
        problem = f"size {done} bytes instead of {size}"
    elif sha256 is not None and actual != sha256.lower():
        problem = f"sha256 {actual} instead of {sha256.lower()}"
    elif sha256 is None and sha256_prefix is not None and not actual.startswith(sha256_prefix.lower()):
        problem = f"sha256 {actual} does not start with {sha256_prefix.lower()}"
    if problem is not None:
        part.unlink()
        raise ChecksumError(
            f"the file downloaded from {url} has {problem}; the bad file was deleted. "
            "Run the download again, or check that the URL is right."
        )
    os.replace(part, destination)
    return actual


def _hash_file(path: Path, digest) -> int:
    """Feed the bytes of ``path`` into ``digest``; return their count."""
    count = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(PROGRESS_EVERY_BYTES), b""):
            digest.update(block)
            count += len(block)
    return count
