"""The client of `clisc serve`: CLISC run on another machine, from Slicer without torch.

`EngineServer` is one server (its URL, API key, and the CA certificate of a self-signed TLS server); `RemoteSession`
is a volume uploaded to it once, then segmented, refined and propagated there. Each call blocks until its job has
finished, reporting the server's progress (``progress(stage, done, total, message, **fields)``; while it waits,
stage "queued" with ``queue_position``) and sending Cancel to the server (``cancel``: a `clisc.progress.CancelToken`;
then `clisc.errors.Cancelled` is raised and nothing is returned). Results come back on the uploaded grid, checked.

Errors: `clisc.errors.InputError` for what the server refused with a reason (a bad request, the API key, a version
mismatch, a full server), `ServerGone` when the server stopped answering, `ServerError` for answers that are not a
CLISC server's (a proxy's error page). Only the standard library, numpy and pynrrd (through `clisc.server.wire`)
are used: the module files' remote mode installs nothing else.
"""
import json
import socket
import ssl
import threading
from collections import OrderedDict
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from clisc import __version__
from clisc.errors import Cancelled, InputError
from clisc.server.wire import API_HEADER, API_VERSION, CLISC_HEADER, NRRD_MEDIA_TYPE, decode_array, \
    encode_array, from_text, to_text, version_mismatch

WAIT_SECONDS = 1.0  # how long one status request waits on the server for news (also: how soon Cancel is sent)
UPLOAD_CHUNK = 1 << 20
GRID_TOLERANCE = 1e-6


class ServerError(RuntimeError):
    """The server answered, but not as a CLISC server does (an HTTP error page, a proxy's answer)."""


class ServerGone(ServerError):
    """The server could not be reached, or stopped answering."""


@dataclass
class Refinement:
    """A refined slice, as `clisc.refine.SliceRefinement`: ``mask`` (rows, columns) bool, SAM's ``iou``, the
    ``prompt`` sent to SAM."""

    axis: int
    index: int
    mask: np.ndarray
    iou: float
    prompt: dict


@dataclass
class Propagation:
    """A propagation, as `clisc.refine.Propagation`: ``mask`` (K, J, I) bool, ``reports`` per direction (dicts of
    `clisc.refine.DirectionReport`'s fields), ``message``, and the slices it rewrote."""

    mask: np.ndarray
    axis: int
    start: int
    reports: Dict[str, dict]
    message: str
    changed_slices: List[int] = field(default_factory=list)


class EngineServer:
    """A `clisc serve` at ``url`` ("https://gpu-host:8451").

    Args:
        apiKey: the server's key (None for a server on this machine without one).
        caFile: a CA certificate (PEM) to trust, for a server with a self-signed certificate.
        timeout: seconds to wait for the server to answer (an upload's chunks included).
    """

    def __init__(self, url: str, apiKey: Optional[str] = None, caFile: Optional[str] = None,
                 timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"server address {url!r}: give it as http://HOST:PORT or https://HOST:PORT")
        self._apiKey = apiKey
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=caFile) if self.url.startswith("https://") else None
        self._info = None

    def __repr__(self) -> str:  # never shows the key
        return f"EngineServer({self.url!r})"

    def info(self, refresh: bool = False) -> dict:
        """The server's versions, models ({"clip": [...], "sam": [...]}), devices, trained runs and limits.
        InputError with the one mismatch message when it speaks another API version."""
        if self._info is None or refresh:
            self._info = self.request("GET", "/info")
        return self._info

    def runs(self) -> list:
        """The trained runs on the server: [{"name", "prompt"}]."""
        return self.request("GET", "/runs")

    def openSession(self, volume, progress: Optional[Callable] = None, cancel=None) -> "RemoteSession":
        """Upload a `clisc.volume.Volume` (gzip NRRD with its IJK→RAS; nothing else about it, not its name)."""
        data = encode_array(volume.array, volume.ijk_to_ras)
        limit = self.info()["limits"]["max_upload_bytes"]
        if len(data) > limit:
            raise InputError(f"the volume is {len(data) / 2 ** 20:.0f} MiB compressed; this server takes at most "
                             f"{limit / 2 ** 20:.0f} MiB (clisc serve --max-upload-mb)")
        answer = self.request("POST", "/sessions", _Upload(data, progress, cancel), NRRD_MEDIA_TYPE)
        return RemoteSession(self, answer, volume)

    # -- HTTP

    def request(self, method: str, path: str, body=None, contentType: str = "application/json",
                timeout: Optional[float] = None, raw: bool = False):
        """One request to ``/v1`` + ``path``: the answer's JSON (``raw``: its bytes)."""
        headers = {API_HEADER: str(API_VERSION), CLISC_HEADER: __version__}
        if self._apiKey:
            headers["Authorization"] = f"Bearer {self._apiKey}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        if body is not None:
            headers["Content-Type"] = contentType
            headers["Content-Length"] = str(len(body))
        request = urllib.request.Request(self.url + "/v1" + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout, context=self._ssl) as answer:
                self._checkVersion(answer.headers)
                data = answer.read()
        except urllib.error.HTTPError as error:
            raise self._refusal(error) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise InputError(f"the certificate of {self.url} is not trusted ({reason.verify_message}): give the "
                                 "server's CA certificate (caFile), or use a certificate from a known authority") from None
            raise ServerGone(f"the CLISC server at {self.url} does not answer ({reason}): is `clisc serve` running "
                             "there, and reachable from here?") from None
        return data if raw else json.loads(data or b"null")

    def _checkVersion(self, headers) -> None:
        serverApi = headers.get(API_HEADER)
        if serverApi is None:
            raise ServerError(f"{self.url} answered, but not as a CLISC server (no {API_HEADER} header): check the "
                              "address and port, and that a proxy in front of it passes the requests on")
        if serverApi != str(API_VERSION):
            raise InputError(version_mismatch(API_VERSION, __version__, serverApi, headers.get(CLISC_HEADER, "?")))

    def _refusal(self, error: urllib.error.HTTPError) -> Exception:
        body = error.read()
        try:
            detail = json.loads(body)["detail"]
        except (ValueError, KeyError, TypeError):
            detail = None
        if detail is None or error.headers.get(API_HEADER) is None:
            return ServerError(f"HTTP {error.code} from {self.url}: the server, or a proxy in front of it, did not "
                               f"answer as a CLISC server ({body[:200].decode(errors='replace').strip() or error.reason}); "
                               "is `clisc serve` running behind it?")
        if error.code == 401:
            return InputError(f"the server at {self.url} refused the API key ({detail}): check the key")
        if error.code >= 500:
            return ServerError(f"the server at {self.url} failed: {detail}")
        return InputError(detail)


class RemoteSession:
    """A volume on a server (`EngineServer.openSession`); ``jobs``: the ids of the jobs run on it, in order."""

    def __init__(self, server: EngineServer, answer: dict, volume) -> None:
        self.server, self.id = server, answer["session"]
        self.jobs: List[str] = []
        self.shape, self.ijk_to_ras = tuple(answer["shape"]), np.asarray(volume.ijk_to_ras, dtype=float)

    def close(self) -> None:
        """Free the volume on the server (an unreachable server drops it once idle)."""
        try:
            self.server.request("DELETE", f"/sessions/{self.id}", raw=True)
        except (InputError, ServerError):
            pass

    def segment(self, prompts, preset="accurate", clip=None, sam=None, saliencyMaps=False, progress=None,
                cancel=None, **options):
        """Text-prompted segmentation on the server: a `clisc.result.SegmentResult` (masks on this grid; the
        saliency maps too with ``saliencyMaps``). ``options``: other `clisc.zeroshot.SegmentOptions` fields
        (saliency="gradcam", slices="all", negative_prompts=[...], ...)."""
        body = {"prompts": list(prompts), "preset": preset, "clip": clip, "sam": sam, "options": options,
                "saliency_maps": bool(saliencyMaps)}
        return self._segmentResult(self._run("segment", body, progress, cancel), saliencyMaps)

    def apply(self, run: str, progress=None, cancel=None):
        """A trained run on the server (by name, `EngineServer.runs`) on this volume: a `SegmentResult`."""
        return self._segmentResult(self._run("apply", {"run": run}, progress, cancel), False)

    def refine(self, mask, index, points=None, labels=None, box=None, axis="auto", sam=None, preset=None,
               progress=None, cancel=None) -> Refinement:
        """`clisc.refine.Refiner.refine` on the server: ``mask`` (K, J, I) on this grid, slice ``index`` along
        ``axis``, points (x, y) pixels with labels (1 positive, 0 negative), box (x0, y0, x1, y1)."""
        body = self._sliceRequest(mask, index, axis, sam, preset)
        body.update(points=None if points is None or not len(points) else np.asarray(points, float).tolist(),
                    labels=None if labels is None else [int(v) for v in labels],
                    box=None if box is None else np.asarray(box, float).tolist())
        answer = self.server.request("GET", f"/jobs/{self._run('refine', body, progress, cancel)}/result")
        sliceMask, _ = from_text(answer["mask"], int(np.prod(self.shape)), grid=False)
        return Refinement(answer["axis"], answer["index"], sliceMask > 0, answer["iou"], answer["prompt"])

    def propagate(self, mask, index, direction="both", axis="auto", sam=None, preset=None, progress=None,
                  cancel=None) -> Propagation:
        """`clisc.refine.Refiner.propagate` on the server (the arguments are `refine`'s)."""
        body = dict(self._sliceRequest(mask, index, axis, sam, preset), direction=direction)
        answer = self.server.request("GET", f"/jobs/{self._run('propagate', body, progress, cancel)}/result")
        return Propagation(self._onGrid(from_text(answer["mask"], int(np.prod(self.shape))))[0] > 0, answer["axis"],
                           answer["start"], answer["reports"], answer["message"], answer["changed_slices"])

    # -- jobs

    def _sliceRequest(self, mask, index, axis, sam, preset) -> dict:
        return {"mask": to_text(np.asarray(mask, dtype=bool), self.ijk_to_ras), "index": int(index),
                "axis": axis if isinstance(axis, str) else int(axis), "sam": sam, "preset": preset}

    def _run(self, kind: str, body: dict, progress, cancel) -> str:
        """Submit a job, report its progress until it has ended, and return its id; Cancelled after ``cancel``."""
        job = self.server.request("POST", f"/sessions/{self.id}/{kind}", body)["job"]
        self.jobs.append(job)
        version = -1
        while True:
            if cancel is not None and cancel.cancelled:
                self.server.request("POST", f"/jobs/{job}/cancel")
                raise Cancelled("cancelled: the server stopped the job; nothing was returned")
            status = self.server.request("GET", f"/jobs/{job}?after={version}&wait={WAIT_SECONDS}",
                                         timeout=self.server.timeout + WAIT_SECONDS)
            changed, version = status["version"] != version, status["version"]
            if progress is not None and changed:
                if status["state"] == "queued":
                    position = status["queue_position"] or 0
                    progress("queued", 0, 0, f"{position} job(s) before this one on the server",
                             queue_position=position)
                else:
                    report = status["progress"]
                    progress(report["stage"], report["done"], report["total"], report["message"], **report["fields"])
            if status["state"] == "done":
                return job
            if status["state"] == "cancelled":
                raise Cancelled("the job was cancelled on the server; nothing was returned")
            if status["state"] == "failed":
                raise (InputError if status["error_kind"] == "input" else ServerError)(status["error"])

    def _segmentResult(self, job: str, saliency: bool):
        from clisc.result import SegmentResult

        answer = self.server.request("GET", f"/jobs/{job}/result")
        limit = 4 * int(np.prod(self.shape)) * max(1, len(answer["names"]))
        masks, _ = self._onGrid(decode_array(self.server.request("GET", f"/jobs/{job}/masks", raw=True), limit))
        maps = []
        if saliency:
            stack, _ = self._onGrid(decode_array(self.server.request("GET", f"/jobs/{job}/saliency", raw=True), limit))
            maps = list(stack)
        return SegmentResult([m > 0 for m in masks], answer["names"], maps, answer["report"])

    def _onGrid(self, decoded: tuple) -> tuple:
        """The decoded array, checked to lie on this session's grid (the volume's voxels and IJK→RAS)."""
        array, ijk_to_ras = decoded
        if array.shape[-3:] != self.shape or not np.allclose(ijk_to_ras, self.ijk_to_ras, atol=GRID_TOLERANCE):
            raise ServerError(f"the server sent a result on another grid ({array.shape[-3:]} voxels) than the "
                              f"volume's ({self.shape}): it was not written")
        return decoded


class VolumeSessions:
    """The sessions of the volumes a Slicer module works on, on one server: a volume is uploaded once and its session
    reused while its voxels and geometry are unchanged (its ``signature``), for the ``limit`` volumes used last (an
    older one's session is closed, freeing it on the server)."""

    def __init__(self, server: EngineServer, limit: int = 3) -> None:
        self.server, self.limit = server, limit
        self._sessions = OrderedDict()  # volume key -> (signature, RemoteSession)
        self._lock = threading.Lock()

    def prepare(self, key, signature, volume: Callable) -> Callable:
        """On the main thread: a function ``(progress, cancel) -> RemoteSession`` for a worker thread, which uploads
        ``volume()`` (called here, now, only when the kept session does not hold this signature)."""
        with self._lock:
            kept = self._sessions.get(key)
        if kept is not None and kept[0] == signature:
            return lambda progress=None, cancel=None: kept[1]
        copy = volume()

        def upload(progress=None, cancel=None) -> RemoteSession:
            session = self.server.openSession(copy, progress, cancel)
            with self._lock:
                dropped = [self._sessions.pop(key, (None, None))[1]]
                self._sessions[key] = (signature, session)
                while len(self._sessions) > self.limit:
                    dropped.append(self._sessions.popitem(last=False)[1][1])
            for old in dropped:
                if old is not None:
                    old.close()
            return session

        return upload

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = [kept[1] for kept in self._sessions.values()], OrderedDict()
        for session in sessions:
            session.close()


class _Upload:
    """An upload's bytes in chunks (urllib sends an iterable body chunk by chunk), reporting progress and stopping
    at Cancel."""

    def __init__(self, data: bytes, progress, cancel) -> None:
        self.data, self.progress, self.cancel = data, progress, cancel

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for start in range(0, len(self.data), UPLOAD_CHUNK):
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            if self.progress is not None:
                self.progress("uploading", start, len(self.data), f"{len(self.data) / 2 ** 20:.1f} MiB")
            yield self.data[start:start + UPLOAD_CHUNK]
        if self.progress is not None:
            self.progress("uploading", len(self.data), len(self.data), "")
