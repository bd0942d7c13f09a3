"""Download one file over HTTP(S) with resume, progress, cancellation and size, sha256 and md5 checks.

The bytes go to ``NAME.part`` next to the destination; only a file that passed the checks is moved onto the
final name (atomically), so a half, corrupt or substituted file never gets the real name. A web page served
in place of the file (Google Drive's confirmation page, a proxy's login page) is recognised and named.
An interrupted or cancelled download keeps its ``.part`` and the next call resumes it.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

from ..errors import Cancelled, InputError, WriteError
from ..progress import CancelToken, ProgressCallback, no_progress

CHUNK_BYTES = 64 * 1024
PROGRESS_EVERY_BYTES = 1024 * 1024
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<!--", b"<?xml")


class DownloadError(InputError):
    """The file could not be fetched: no network, a timeout, or an HTTP error."""


class ChecksumError(InputError):
    """The downloaded file does not have the expected size or sha256 (it has been deleted)."""


def download(
    url: str,
    destination: Path,
    sha256: Optional[str] = None,
    sha256_prefix: Optional[str] = None,
    md5_prefix: Optional[str] = None,
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
        md5_prefix: expected leading hex digits of the md5 (checked when given).
        size: expected size in bytes (checked before the hash when given).
        progress: called as ``progress("download NAME", done_bytes, total_bytes, "")`` about every MB;
            ``total_bytes`` is 0 while the server has not told the size.
        cancel: polled between chunks; on cancel the ``.part`` is kept for a later resume.
        timeout: seconds to wait for the connection and for each read.
        import_hint: the exact command that imports a manually downloaded copy, shown when fetching fails.

    Raises:
        DownloadError: network failure (``.part`` kept), HTTP error, or a web page instead of the file (deleted).
        ChecksumError: wrong size or hash (``.part`` deleted).
        WriteError: the ``.part`` could not be written, as on a full disk (kept for a resume).
        Cancelled: ``cancel`` was set.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    stage = f"download {destination.name}"
    digests = _new_digests()
    done = hash_file(part, digests) if part.exists() else 0

    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if done and response.getcode() != 206:  # the server ignores Range: start over
                digests, done = _new_digests(), 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length else (size or 0)
            progress(stage, done, total, "")
            reported = done
            with open(part, "ab" if done else "wb", buffering=0) as out:  # unbuffered: no write left to close()
                while True:
                    if cancel is not None and cancel.cancelled:
                        raise Cancelled(f"download of {url} cancelled; {part} is kept and the next download resumes it")
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    _append(out, chunk, part)
                    for digest in digests:
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

    page = html_page(part)
    if page is not None:
        part.unlink()
        kind, remedy = page
        raise DownloadError(
            f"the file downloaded from {url} is an HTML page, not a checkpoint ({kind}?); it was deleted. {remedy} "
            f"Then import the file with: {import_hint or 'clisc models import NAME FILE'}"
        )
    actual, md5 = (digest.hexdigest() for digest in digests)
    problem = digest_problem((done, actual, md5), size=size, sha256=sha256, sha256_prefix=sha256_prefix,
                             md5_prefix=md5_prefix)
    if problem is not None:
        part.unlink()
        raise ChecksumError(
            f"the file downloaded from {url} has {problem}; the bad file was deleted. "
            "Run the download again, or check that the URL is right."
        )
    os.replace(part, destination)
    return actual


def _append(out, chunk: bytes, part: Path) -> None:
    """Write all of ``chunk`` to the unbuffered file ``out``; `WriteError` (the disk may be full) on failure, which
    the network errors' handler does not catch: the download itself was not at fault."""
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view):]
    except OSError as error:
        raise WriteError(
            f"{part}: could not be written ({error.strerror or error}); the disk may be full, or a quota or "
            f"file-size limit reached. What was downloaded so far stays in {part.name}: free some space and run "
            "the same command again to resume (or delete that file)."
        ) from error


def digest_problem(actual: Tuple[int, str, str], size: Optional[int] = None, sha256: Optional[str] = None,
                   sha256_prefix: Optional[str] = None, md5_prefix: Optional[str] = None) -> Optional[str]:
    """What is wrong with a file whose (byte count, sha256, md5) is ``actual``, or None when it is as expected.

    ``sha256_prefix`` is checked only when no whole ``sha256`` is given; ``size`` and ``md5_prefix`` always."""
    count, actual_sha256, actual_md5 = actual
    if size is not None and count != size:
        return f"size {count} bytes instead of {size}"
    if sha256 is not None and actual_sha256 != sha256.lower():
        return f"sha256 {actual_sha256} instead of {sha256.lower()}"
    if sha256 is None and sha256_prefix is not None and not actual_sha256.startswith(sha256_prefix.lower()):
        return f"sha256 {actual_sha256} does not start with {sha256_prefix.lower()}"
    if md5_prefix is not None and not actual_md5.startswith(md5_prefix.lower()):
        return f"md5 {actual_md5} does not start with {md5_prefix.lower()}, the digits in the official file name"
    return None


def file_digests(path: Path) -> Tuple[int, str, str]:
    """(byte count, sha256, md5) of the file at ``path``, read once."""
    digests = _new_digests()
    count = hash_file(path, digests)
    return (count, *(digest.hexdigest() for digest in digests))


def hash_file(path: Path, digests) -> int:
    """Feed the bytes of ``path`` into each of ``digests``; return their count."""
    count = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(PROGRESS_EVERY_BYTES), b""):
            for digest in digests:
                digest.update(block)
            count += len(block)
    return count


def _new_digests() -> tuple:
    # md5 only for the published prefixes in file names, not for security (FIPS systems allow it so flagged).
    return hashlib.sha256(), hashlib.md5(usedforsecurity=False)


def html_page(path: Path) -> Optional[Tuple[str, str]]:
    """(what page it probably is, what to do) when the file at ``path`` is an HTML page; None otherwise.

    Servers answer with a page instead of the file when they want a click or a login: Google Drive's
    virus-scan confirmation for large files, a proxy or portal login, a Hugging Face 'Repository not found'."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not text.startswith(_HTML_STARTS):  # a checkpoint starts with a zip or pickle header, never with "<"
        return None
    if b"google drive" in text or b"drive.google.com" in text or b"drive.usercontent.google.com" in text:
        return ("Google Drive's download-confirmation page",
                "Google Drive asks for a click before large files: open the link in a browser, confirm with "
                "'Download anyway', and use the file it saves.")
    if b"hugging face" in text or b"huggingface" in text:
        return ("a Hugging Face error page such as 'Repository not found'",
                "The repository, revision or file was not found, or needs a login: check the address in a browser.")
    if b"password" in text or b"login" in text or b"log in" in text or b"sign in" in text:
        return ("a login page, from a proxy or a portal",
                "The network asked for a sign-in: sign in with a browser, download the file there and use that copy.")
    return ("a web page", "Open the link in a browser and download the file itself.")
