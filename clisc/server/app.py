"""The HTTP API of `clisc serve` (FastAPI): authentication, limits, and the endpoints, under ``/v1``.

    GET    /v1/info                       versions, models, devices, trained runs, limits
    GET    /v1/runs                       the trained runs (name, prompt)
    POST   /v1/sessions                   body: the volume as gzip NRRD with its IJK→RAS -> {session, shape}
    DELETE /v1/sessions/{id}              close it (its jobs are cancelled)
    POST   /v1/sessions/{id}/segment      {prompts, preset, clip, sam, options, saliency_maps} -> {job, queue_position}
    POST   /v1/sessions/{id}/apply        {run} -> a job: the trained run's U-Net
    POST   /v1/sessions/{id}/refine       {mask, index, points, labels, box, axis, sam, preset} -> a job
    POST   /v1/sessions/{id}/propagate    {mask, index, direction, axis, sam, preset} -> a job
    GET    /v1/jobs/{id}?after=V&wait=S   state, queue position, progress; waits up to S s for a change past V
    POST   /v1/jobs/{id}/cancel
    GET    /v1/jobs/{id}/result           JSON: the report and names; a refinement's or propagation's masks
    GET    /v1/jobs/{id}/masks            gzip NRRD (N, K, J, I) uint8 on the session's grid, one per prompt
    GET    /v1/jobs/{id}/saliency         gzip NRRD (N, K, J, I) float32 (when asked for)

Every request must carry ``Authorization: Bearer KEY`` when the server has a key (checked in constant time before
anything else is read), and may state its API version (``X-CLISC-API``): another version is answered 409 with the
one message that names both. Errors are ``{"detail": "what was wrong and what to do"}``: 400 a request that cannot
be run, 401 the key, 404 an unknown or expired session or job, 409 a result not there (cancelled, failed, still
running) or a version mismatch, 413 an upload over the limit, 422 a malformed request, 503 a full server.
The engine work is the same as the CLI's and Slicer's: `ZeroShotSegmenter`, `apply_run`, `Refiner`.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import InputError
from ..volume import Volume, slice_axis
from .gate import Gate
from .jobs import DONE, Job, QueueFull
from .models import DEFAULT_REFINE_SAM, ModelRegistry
from .service import Server, ServerSettings
from .sessions import Session, SessionLimit
from .wire import API_VERSION, NRRD_MEDIA_TYPE, decode_array, encode_array, from_text, to_text

logger = logging.getLogger("clisc.server")

MAX_WAIT_SECONDS = 5.0  # the longest a status request waits for a change


# -- requests

class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentRequest(_Request):
    prompts: List[str]
    preset: str = "accurate"
    clip: Optional[str] = None          # a model name this server offers; None: the preset's
    sam: Optional[str] = None
    options: Dict[str, Any] = {}        # other `SegmentOptions` fields (not clip, sam or device)
    saliency_maps: bool = False         # keep the saliency maps for /saliency


class ApplyRequest(_Request):
    run: str


class SliceRequest(_Request):
    mask: str                           # the segment: base64 gzip NRRD (K, J, I) uint8 on the session's grid
    index: int                          # the slice, along ``axis``
    axis: Union[int, str] = "auto"      # 0/1/2, or auto, axial, coronal, sagittal, k, j, i
    sam: Optional[str] = None           # None: the preset's SAM, or LiteMedSAM without a preset
    preset: Optional[str] = None


class RefineRequest(SliceRequest):
    points: Optional[List[Tuple[float, float]]] = None  # (x, y) = (column, row) pixels of the slice
    labels: Optional[List[int]] = None  # 1 positive, 0 negative
    box: Optional[Tuple[float, float, float, float]] = None


class PropagateRequest(SliceRequest):
    direction: str = "both"


# -- the app

def create_app(settings: ServerSettings, registry: ModelRegistry) -> FastAPI:
    """The FastAPI application of a server; its lifespan starts the job workers and, at shutdown, cancels every
    job and removes the temporary folder."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.server = Server(settings, registry)
        try:
            yield
        finally:
            await run_in_threadpool(app.state.server.close)

    app = FastAPI(title="CLISC", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Gate, api_key=settings.api_key)
    app.include_router(_routes())
    _handle_errors(app)
    return app


def _routes() -> APIRouter:
    router = APIRouter(prefix="/v1")

    def server(request: Request) -> Server:
        return request.app.state.server

    @router.get("/info")
    def info(request: Request) -> dict:
        s = server(request)
        return {"api_version": API_VERSION, "clisc_version": __version__, "devices": list(s.settings.devices),
                "models": {family: s.registry.names(family) for family in ("clip", "sam")},
                "runs": [run["name"] for run in s.registry.runs()],
                "limits": {"max_upload_bytes": int(s.settings.max_upload_mb * 2 ** 20),
                           "max_sessions": s.settings.max_sessions, "max_queued": s.settings.max_queued,
                           "session_timeout_s": s.settings.session_timeout_s},
                "sessions": len(s.sessions), "queued": s.queue.queued()}

    @router.get("/runs")
    def runs(request: Request) -> list:
        return server(request).registry.runs()

    @router.post("/sessions", status_code=201)
    async def open_session(request: Request) -> dict:
        s = server(request)
        volume = await _receive_volume(request, s)
        session = s.sessions.open(volume)
        logger.info("session %s opened: %s voxels of %s", session.id, " × ".join(map(str, volume.array.shape)),
                    volume.array.dtype)
        return {"session": session.id, "shape": list(volume.array.shape)}

    @router.delete("/sessions/{session_id}", status_code=204)
    def close_session(request: Request, session_id: str) -> Response:
        if not server(request).close_session(session_id):
            raise _unknown_session(session_id, server(request))
        return Response(status_code=204)

    @router.post("/sessions/{session_id}/segment", status_code=202)
    def segment(request: Request, session_id: str, body: SegmentRequest) -> dict:
        from ..zeroshot import check_options, check_prompts, preset_options

        s = server(request)
        session = _session(s, session_id)
        prompts = check_prompts(body.prompts)
        fields = _segment_fields(body.options)
        if fields.get("negative_prompts") is not None:
            fields["negative_prompts"] = tuple(check_prompts(fields["negative_prompts"]))
        options = preset_options(body.preset, clip=body.clip, sam=body.sam, device=s.settings.devices[0], **fields)
        s.registry.check("clip", options.clip)
        s.registry.check("sam", options.sam)
        check_options(session.volume, options)
        volume, keep_saliency = session.volume, body.saliency_maps

        def work(device, progress, cancel):
            from ..zeroshot import ZeroShotSegmenter

            progress("loading models", 0, 1, "")
            clip, sam = (s.registry.load(family, getattr(options, family), device) for family in ("clip", "sam"))
            progress("loading models", 1, 1, "")
            segmenter = ZeroShotSegmenter(replace(options, device=device), clip=clip, sam=sam)
            return _masks_answer(segmenter.segment(volume, prompts, progress=progress, cancel=cancel), volume,
                                 keep_saliency)

        return s.submit(session, "segment", work)

    @router.post("/sessions/{session_id}/apply", status_code=202)
    def apply(request: Request, session_id: str, body: ApplyRequest) -> dict:
        from ..cohort.apply import apply_run

        s = server(request)
        session = _session(s, session_id)
        folder, volume = s.registry.run_path(body.run), session.volume

        def work(device, progress, cancel):
            return _masks_answer(apply_run(folder, volume, device, progress=progress, cancel=cancel), volume, False)

        return s.submit(session, "apply", work)

    @router.post("/sessions/{session_id}/refine", status_code=202)
    def refine(request: Request, session_id: str, body: RefineRequest) -> dict:
        s = server(request)
        session = _session(s, session_id)
        mask, axis, sam = _slice_request(s, session, body)

        def work(device, progress, cancel):
            segmenter, cache = s.registry.refinement_sam(sam, device)
            refiner = session.refiner(segmenter, axis, cache)
            refinement = refiner.refine(mask, body.index, body.points, body.labels, body.box)
            return {"json": {"axis": refinement.axis, "index": refinement.index, "iou": refinement.iou,
                             "prompt": refinement.prompt, "mask": to_text(refinement.mask)}}

        return s.submit(session, "refine", work, pinned=True)

    @router.post("/sessions/{session_id}/propagate", status_code=202)
    def propagate(request: Request, session_id: str, body: PropagateRequest) -> dict:
        s = server(request)
        session = _session(s, session_id)
        mask, axis, sam = _slice_request(s, session, body)

        def work(device, progress, cancel):
            segmenter, cache = s.registry.refinement_sam(sam, device)
            refiner = session.refiner(segmenter, axis, cache)
            result = refiner.propagate(mask, body.index, body.direction, progress=progress, cancel=cancel)
            return {"json": {"axis": result.axis, "start": result.start, "message": result.message,
                             "reports": {name: asdict(report) for name, report in result.reports.items()},
                             "changed_slices": result.changed_slices,
                             "mask": to_text(result.mask, session.volume.ijk_to_ras)}}

        return s.submit(session, "propagate", work, pinned=True)

    @router.get("/jobs/{job_id}")
    def job_status(request: Request, job_id: str, after: int = -1, wait: float = 0.0) -> dict:
        s = server(request)
        job = _job(s, job_id)
        job.wait_for_change(after, min(max(wait, 0.0), MAX_WAIT_SECONDS))
        return {"job": job.id, "kind": job.kind, "state": job.state, "queue_position": s.queue.position(job),
                "progress": job.progress, "error": job.error, "error_kind": job.error_kind, "version": job.version}

    @router.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: str) -> dict:
        s = server(request)
        job = _job(s, job_id)
        s.queue.cancel(job)
        return {"job": job.id, "state": job.state}

    @router.get("/jobs/{job_id}/result")
    def result(request: Request, job_id: str) -> dict:
        return _result(_job(server(request), job_id))["json"]

    @router.get("/jobs/{job_id}/{part}")
    def masks(request: Request, job_id: str, part: str) -> Response:
        answer = _result(_job(server(request), job_id))
        if part not in ("masks", "saliency") or answer.get(part) is None:
            raise HTTPException(404, f"this job has no {part}" + (" (ask for it with saliency_maps: true)"
                                                                   if part == "saliency" else ""))
        return Response(answer[part], media_type=NRRD_MEDIA_TYPE)

    return router


async def _receive_volume(request: Request, s: Server) -> Volume:
    """The uploaded volume: the body spooled into the temporary folder (at most the upload limit), read, and the
    file removed again, whatever happened (a client that goes away mid-upload included)."""
    limit = int(s.settings.max_upload_mb * 2 ** 20)
    too_large = HTTPException(413, f"the upload is larger than this server takes ({s.settings.max_upload_mb:g} MiB, "
                                   "clisc serve --max-upload-mb)")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    spool = tempfile.NamedTemporaryFile(dir=s.temp_dir, prefix="upload-", suffix=".nrrd", delete=False)
    try:
        with spool:
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large
                spool.write(chunk)
        if received == 0:
            raise InputError("the upload is empty: send the volume as the request body (gzip NRRD)")

        def read() -> Volume:
            with open(spool.name, "rb") as file:
                array, ijk_to_ras = decode_array(file, int(s.settings.max_volume_mb * 2 ** 20))
            if array.ndim != 3:
                raise InputError(f"a {array.ndim}D array: send one 3D scalar volume (K, J, I)")
            return Volume(array, ijk_to_ras, "upload")

        return await run_in_threadpool(read)
    except ClientDisconnect:
        logger.info("an upload was cut short: the client went away; its partial file is removed")
        raise
    finally:
        Path(spool.name).unlink(missing_ok=True)


def _segment_fields(options: Dict[str, Any]) -> dict:
    """The `SegmentOptions` fields a client may set, type-checked; InputError for another or a wrong type."""
    from ..zeroshot import SegmentOptions

    allowed = set(SegmentOptions.__dataclass_fields__) - {"clip", "sam", "device"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(allowed))} "
                         "(clip and sam are fields of their own; the server chooses the device)")
    try:
        checked = TypeAdapter(SegmentOptions).validate_python({**asdict(SegmentOptions()), **options})
    except ValidationError as error:
        raise InputError("bad option: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                    for e in error.errors())) from None
    return {name: getattr(checked, name) for name in options}


def _slice_request(s: Server, session: Session, body: SliceRequest) -> tuple:
    """(the mask as a Volume on the session's grid, the slice axis, the SAM name) of a refine or propagate
    request; InputError for a mask on another grid, an unknown axis or SAM."""
    from ..zeroshot import preset_options

    array, ijk_to_ras = from_text(body.mask, session.volume.array.size)
    if array.shape != session.volume.array.shape or not np.allclose(ijk_to_ras, session.volume.ijk_to_ras, atol=1e-3):
        raise InputError(f"the mask ({' × '.join(map(str, array.shape))} voxels) is not on the session's volume grid "
                         f"({' × '.join(map(str, session.volume.array.shape))}, same IJK→RAS): send the segment on "
                         "the uploaded volume's grid")
    axis = body.axis if isinstance(body.axis, int) else slice_axis(session.volume, body.axis)
    if axis not in (0, 1, 2):
        raise InputError(f"axis {body.axis!r}: use 0 (k), 1 (j) or 2 (i)")
    sam = body.sam or (preset_options(body.preset).sam if body.preset else DEFAULT_REFINE_SAM)
    return Volume(array > 0, ijk_to_ras), axis, s.registry.check("sam", sam)


def _masks_answer(result, volume: Volume, keep_saliency: bool) -> dict:
    """A segmentation's answer: the report and names (JSON) and its masks (and saliency maps) as gzip NRRD."""
    saliency = None
    if keep_saliency and result.saliency:
        saliency = encode_array(np.stack(result.saliency).astype(np.float32), volume.ijk_to_ras)
    return {"json": {"names": result.names, "report": result.report},
            "masks": encode_array(np.stack(result.masks).astype(np.uint8), volume.ijk_to_ras), "saliency": saliency}


def _session(s: Server, session_id: str) -> Session:
    try:
        return s.sessions.get(session_id)
    except KeyError:
        raise _unknown_session(session_id, s) from None


def _unknown_session(session_id: str, s: Server) -> HTTPException:
    return HTTPException(404, f"no session {session_id!r} on this server: it was closed, dropped after "
                              f"{s.settings.session_timeout_s:g} s idle, or the server restarted; send the volume again")


def _job(s: Server, job_id: str) -> Job:
    try:
        return s.sessions.job(job_id)
    except KeyError:
        raise HTTPException(404, f"no job {job_id!r} on this server: its session was closed or expired, or the "
                                 "server restarted") from None


def _result(job: Job) -> dict:
    if job.state != DONE:
        said = {"queued": "is still queued", "running": "is still running", "cancelled": "was cancelled: it has "
                "no result", "failed": f"failed: {job.error}"}[job.state]
        raise HTTPException(409, f"the job {said}")
    return job.result


def _handle_errors(app: FastAPI) -> None:
    def answer(status: int, detail: str, **headers) -> JSONResponse:
        return JSONResponse({"detail": detail}, status, headers=headers or None)

    @app.exception_handler(InputError)
    async def input_error(request, error):
        return answer(400, str(error))

    @app.exception_handler(QueueFull)
    @app.exception_handler(SessionLimit)
    async def busy(request, error):
        return answer(503, str(error), **{"Retry-After": "30"})

    @app.exception_handler(RequestValidationError)
    async def malformed(request, error):
        problems = []
        for e in error.errors():
            where = ".".join(str(part) for part in e.get("loc", ()) if part != "body") or "the body"
            problems.append(f"{where}: {e.get('msg')}")
        return answer(422, "the request is malformed: " + "; ".join(problems)[:1000])
