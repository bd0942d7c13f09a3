"""CLISCLib, the package both Slicer modules share, on its own: the background jobs (a worker thread and a process,
one interface: start, poll progress, finished, cancel, result or error), the terminology table (a JSON resource),
and the MRML adapter's colour-to-grey conversion (the CLI readers' own). The adapter's other duties, the package
installation and the progress GUI are tested through the modules in test_slicer_segment.py and
test_slicer_train.py (the Qt widgets need real Slicer)."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback

import numpy as np
import pytest

from clisc.errors import Cancelled
from clisc.progress import CancelToken
from clisc.readers import read_volume


def poll_until_news(job, timeout: float = 30) -> list:
    """Poll ``job`` until something arrives; what arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        updates = job.poll()
        if updates:
            return updates
        time.sleep(0.01)
    pytest.fail("nothing arrived in time")


# -- one interface for both kinds of job


@pytest.mark.parametrize("kind", ["ThreadJob", "ProcessJob"])
def test_both_kinds_of_job_offer_the_same_interface(jobs, kind):
    job_class = getattr(jobs, kind)
    assert issubclass(job_class, jobs.BackgroundJob)
    job = job_class(lambda progress, cancel: None) if kind == "ThreadJob" else job_class([sys.executable, "-c", ""])
    assert not job.finished and job.poll() == [] and job.result is None and job.error is None
    assert job.progress == jobs.Progress("starting") and job.log == [] and not job.cancelled
    for name in ("start", "poll", "finished", "cancel", "cancelled", "wait", "progress", "log", "result", "error"):
        assert hasattr(job, name), name
    job.start()
    assert job.wait(60) is None and job.finished


# -- ThreadJob: in-process work on a worker thread


def test_thread_job_hands_progress_and_its_fields_to_the_main_thread_in_order(jobs):
    def work(progress, cancel):
        for epoch in range(1, 4):
            progress("unet", epoch, 3, "fold A", case="pat01", epoch=epoch, loss=1.0 / epoch)
        return threading.current_thread()

    job = jobs.ThreadJob(work)
    job.start()
    seen = []
    worker = job.wait(60, progress=lambda stage, done, total, message="", **fields: seen.append(
        (stage, done, total, message, fields, threading.current_thread())))
    assert worker is not threading.main_thread() and job.result is worker and job.finished
    assert [report[:5] for report in seen] == [
        ("unet", epoch, 3, "fold A", {"case": "pat01", "epoch": epoch, "loss": 1.0 / epoch}) for epoch in (1, 2, 3)]
    assert all(report[5] is threading.main_thread() for report in seen)
    assert job.progress == jobs.Progress("unet", 3, 3, "fold A", {"case": "pat01", "epoch": 3, "loss": 1 / 3})
    assert job.progress.percent == 100 and job.progress.heading() == "unet 3/3"
    assert job.progress.details() == "fold A, case pat01, epoch 3, loss 0.3333"


def test_poll_hands_out_what_arrived_and_the_job_finishes_after_its_last_report(jobs):
    release = threading.Event()

    def work(progress, cancel):
        progress("a", 1, 2)
        release.wait(30)
        progress("a", 2, 2)
        return "made"

    job = jobs.ThreadJob(work)
    job.start()
    assert poll_until_news(job) == [jobs.Progress("a", 1, 2)]
    assert not job.finished and job.result is None
    with pytest.raises(TimeoutError):
        job.wait(0.2)
    release.set()
    assert job.wait(30) == "made"
    assert job.progress == jobs.Progress("a", 2, 2) and job.poll() == []


def test_cancel_reaches_the_work_through_its_token_and_the_job_ends_cancelled(jobs):
    started = threading.Event()

    def work(progress, cancel):
        started.set()
        while True:
            cancel.raise_if_cancelled()
            time.sleep(0.01)

    job = jobs.ThreadJob(work)
    job.start()
    assert started.wait(30) and not job.cancelled
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(30)
    assert job.cancelled and isinstance(job.error, Cancelled) and job.result is None

    token = CancelToken()  # a caller's token (the console API's ``cancel``) is the job's
    token.cancel()
    finished = []
    given = jobs.ThreadJob(lambda progress, cancel: cancel.raise_if_cancelled(), finished.append, token=token)
    given.start()
    with pytest.raises(Cancelled):
        given.wait(30)
    assert given.cancelled and finished == []  # no write-back after a cancel


def test_an_error_in_the_work_is_the_jobs_error_and_nothing_is_written_back(jobs):
    finished = []

    def work(progress, cancel):
        raise ValueError("not a volume")

    job = jobs.ThreadJob(work, finished.append)
    job.start()
    with pytest.raises(ValueError, match="not a volume") as raised:
        job.wait(30)
    assert raised.value is job.error and job.result is None and finished == [] and not job.cancelled
    assert any(frame.name == "work" for frame in traceback.extract_tb(job.error.__traceback__))


def test_the_finish_step_runs_on_the_main_thread_and_its_failure_is_the_jobs_error(jobs):
    threads = []

    def finish(output):
        threads.append(threading.current_thread())
        return f"{output} written"

    job = jobs.ThreadJob(lambda progress, cancel: "mask", finish)
    job.start()
    assert job.wait(30) == "mask written" and threads == [threading.main_thread()]

    def failing(output):
        raise RuntimeError("disk full")

    job = jobs.ThreadJob(lambda progress, cancel: "mask", failing)
    job.start()
    with pytest.raises(RuntimeError, match="disk full"):
        job.wait(30)
    assert job.result is None


def test_the_engines_log_records_from_the_worker_thread_become_the_jobs_log(jobs):
    engine = logging.getLogger("clisc.some_stage")
    handlers = list(logging.getLogger("clisc").handlers)
    other = threading.Thread(target=lambda: engine.warning("from another thread"))

    def work(progress, cancel):
        engine.warning("a prompt was given twice")
        other.start()
        other.join()
        return None

    job = jobs.ThreadJob(work)
    job.start()
    lines = []
    job.wait(30, log=lines.append)
    assert lines == job.log == ["warning: a prompt was given twice"]
    assert logging.getLogger("clisc").handlers == handlers  # the job's handler is gone with it


# -- ProcessJob: a command in its own process group


def test_process_job_reads_json_progress_the_summary_and_the_log(jobs):
    code = ("import json, sys\n"
            "print(json.dumps({'stage': 'unet', 'case': None, 'epoch': 2, 'loss': 0.5, 'done': 2, 'total': 4}))\n"
            "print('a log line', file=sys.stderr, flush=True)\n"
            "print(json.dumps({'stage': 'finished', 'model': 'final.pt'}))\n")
    job = jobs.ProcessJob([sys.executable, "-c", code])
    job.start()
    seen, lines = [], []
    summary = job.wait(60, progress=lambda *report, **fields: seen.append((report, fields)), log=lines.append)
    assert summary == job.result == {"model": "final.pt"} and job.error is None and job.returncode == 0
    assert seen == [(("unet", 2, 4, ""), {"case": None, "epoch": 2, "loss": 0.5})]
    assert lines == job.log == ["a log line"]
    assert [event["stage"] for event in job.events] == ["unet", "finished"]
    assert job.progress.details() == "epoch 2, loss 0.5000"


def test_process_job_fails_with_the_engines_message(jobs):
    code = "import sys; print('starting', file=sys.stderr); print('clisc: error: no such cohort', file=sys.stderr); " \
           "sys.exit(2)"
    job = jobs.ProcessJob([sys.executable, "-c", code])
    job.start()
    with pytest.raises(RuntimeError, match="^error: no such cohort$"):
        job.wait(60)
    assert job.returncode == 2 and not isinstance(job.error, Cancelled) and job.result is None


# -- terminology, a JSON resource


def test_the_terminology_table_is_the_json_resource(terminology, tmp_path):
    table = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    loaded = terminology.loadTerminology()
    assert set(loaded.organs) == {word for entry in table["organs"] for word in entry["words"]}
    assert set(loaded.lesions) == {word for entry in table["lesions"] for word in entry["words"]}
    assert loaded.pairedOrgans == {"lung", "kidney"}

    table["organs"].append({"words": ["femur"], "code": {"scheme": "SCT", "value": "71341001", "meaning": "Femur"}})
    changed = tmp_path / "terminology.json"
    changed.write_text(json.dumps(table), encoding="utf-8")
    assert "~SCT^71341001^Femur~^^~" in terminology.loadTerminology(changed).entry("left femur")
    assert terminology.terminologyEntry("left femur") is None  # the installed table is unchanged


def test_every_terminology_entry_resolves_to_a_snomed_ct_concept(terminology):
    codes = pytest.importorskip("pydicom.sr.codedict").codes
    from pydicom.sr.coding import Code

    snomed = {}  # code value -> its meanings, every SNOMED CT concept of the DICOM standard (pydicom's copy)
    for keyword in dir(codes.SCT):
        code = getattr(codes.SCT, keyword)
        if isinstance(code, Code):
            snomed.setdefault(code.value, set()).add(code.meaning.lower())
    table = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    for category in table["categories"].values():  # Slicer's list names these its own way; the codes are DICOM's
        assert category["scheme"] == "SCT" and category["value"] in snomed, category
    for group in ("organs", "lesions", "sides"):
        for entry in table[group]:
            code = entry["code"]
            assert code["scheme"] == "SCT" and code["meaning"].lower() in snomed.get(code["value"], ()), code

    loaded = terminology.loadTerminology()
    for group, category in (("organs", table["categories"]["organ"]), ("lesions", table["categories"]["lesion"])):
        for entry in table[group]:
            for word in entry["words"]:
                parts = loaded.entry(f"the {word}s").split("~")  # plurals too
                assert len(parts) == 7 and parts[0] == table["categoryContext"] and parts[4] == table["regionContext"]
                assert parts[1] == terminology.codeString(category) and parts[2] == terminology.codeString(entry["code"])
                assert all(len(part.split("^")) == 3 for index, part in enumerate(parts) if index not in (0, 4))


# -- the MRML adapter reads colour as the CLI does


def test_a_colour_image_has_the_same_grey_levels_in_the_cli_and_in_slicer(mrml, tmp_path):
    import SimpleITK as sitk
    import slicer
    from PIL import Image

    from clisc.readers import rgb_to_grey

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    from_cli = read_volume(tmp_path / "colour.png").array
    # Slicer loads a colour image as a vector volume (K, J, I, 3); slicer-core reads NRRD, not PNG: the same pixels
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "colour.png")), str(tmp_path / "colour.nrrd"))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "colour.nrrd"))
    assert storage.ReadData(node)
    assert np.array_equal(slicer.util.arrayFromVolume(node)[0], rgb)

    from_slicer = mrml.volumeFromNode(node).array
    assert from_slicer.dtype == from_cli.dtype == np.float32 and from_slicer.shape == from_cli.shape == (1, 20, 30)
    assert np.array_equal(from_slicer, from_cli)
    assert np.array_equal(from_cli[0], rgb_to_grey(rgb))
    assert np.abs(from_cli[0] - rgb.mean(axis=-1)).max() > 10  # the channel mean Slicer used before differs
    slicer.mrmlScene.RemoveNode(node)
