"""A full disk: no writer reports success on a short write, none leaves a partial file or replaces an original.

A full disk is reproduced portably: a child process whose file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored)
makes every write past ``LIMIT`` bytes fail with EFBIG, as a full disk fails it with ENOSPC. The child runs the
real ``clisc segment`` (tiny CLIP and a random LiteMedSAM: the mechanics, not accuracy), or `write_each`, which
calls every writer of CLISC once. POSIX only (no RLIMIT_FSIZE on Windows).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE is POSIX")

LIMIT = 8192  # bytes: every output below is larger (noise compresses badly), every input is only read


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: a write past the limit gets EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def run_limited(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` with the file-size limit, this folder importable."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    # UTF-8 whatever the locale: in the full suite an earlier test leaves this process's preferred encoding ASCII
    return subprocess.run([sys.executable, *map(str, args)], preexec_fn=_limit_file_size, capture_output=True,
                          encoding="utf-8", errors="replace", env={**os.environ, "PYTHONPATH": path, **env})


def noise(shape=(40, 50, 50)) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 100, size=shape).astype(np.float32)


def test_segment_on_a_full_disk_fails_naming_the_file_and_keeps_the_original(tmp_path):
    """ITK writes a NIfTI cut short without raising: the command said "wrote out.nii" and exited 0."""
    clip = save_random_clip(tmp_path / "clip", TINY_CLIP_CONFIG)
    sam = save_random_sam(tmp_path / "litemedsam.pth", "litemedsam")
    image = sitk.GetImageFromArray(noise((4, 64, 64)))
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "out.nii").write_bytes(b"the original")
    run = run_limited("-m", "clisc", "segment", tmp_path / "image.nii.gz", "--prompt", "tumor", "-o",
                      outputs / "out.nii", "--overwrite", "--saliency-out", outputs / "saliency.nii", "--report",
                      outputs / "report.json", "--clip", clip, "--sam", sam, "--preset", "fast", "--saliency",
                      "gradcam", "--slices", "1:1")
    assert run.returncode == 2, run.stderr
    assert f"{outputs / 'out.nii'}: could not be written" in run.stderr
    assert "the disk may be full" in run.stderr and "Traceback" not in run.stderr
    assert "wrote" not in run.stdout
    assert [path.name for path in outputs.iterdir()] == ["out.nii"]
    assert (outputs / "out.nii").read_bytes() == b"the original"


def write_each(folder: str) -> None:
    """Run in the limited child: call every writer once, targets in ``folder`` (some with an original there),
    and print {writer: the error's message, or None when it raised none} as JSON."""
    from test_download import Server

    from clisc.cohort.run_folder import RunFolder
    from clisc.cohort.unet import save_checkpoint
    from clisc.dicom_seg import write_dicom_seg
    from clisc.errors import WriteError
    from clisc.models import cache
    from clisc.models.catalogue import ModelEntry, RemoteFile
    from clisc.models.download import download
    from clisc.readers import read_volume
    from clisc.volume import Volume
    from clisc.writers import write_bytes, write_masks, write_volume

    folder = Path(folder)
    volume = Volume(noise(), np.diag([0.8, 0.9, 2.5, 1.0]))
    masks = [volume.array > 50, volume.array < 30]
    head = np.zeros(volume.array.shape, bool)
    head.flat[:LIMIT // 2] = masks[0].flat[:LIMIT // 2]
    series = read_volume(folder / "series")
    clip = folder / "tiny_clip"
    entry = ModelEntry("tiny_clip", "clip", "tiny", tuple(
        RemoteFile(f"https://example.org/{name}", name, None, None, "test")
        for name in ("open_clip_config.json", "open_clip_pytorch_model.bin")), "MIT", "", "",
        open_clip_config={"model_cfg": TINY_CLIP_CONFIG})
    cache.get_entry = lambda name: entry
    server = Server(files={"/model.bin": os.urandom(3 * LIMIT)})
    writers = {
        "volume.nii.gz": lambda: write_volume(folder / "volume.nii.gz", volume),
        "volume.nrrd": lambda: write_volume(folder / "volume.nrrd", volume),
        "volume.mha": lambda: write_volume(folder / "volume.mha", volume),
        "volume.mhd": lambda: write_volume(folder / "volume.mhd", volume),
        "labelmap.nii": lambda: write_masks(folder / "labelmap.nii", masks, ["a", "b"], volume),
        # all its labels within the part that fits: ITK's reader gives the rest as zeros, just what was lost
        "zero_tail.nii": lambda: write_masks(folder / "zero_tail.nii", [head], ["a"], volume),
        "mask.seg.nrrd": lambda: write_masks(folder / "mask.seg.nrrd", masks, ["tumeur cérébrale", "脑肿瘤"], volume),
        "seg.dcm": lambda: write_dicom_seg(folder / "seg.dcm", [series.array > 50], ["tumor"], series,
                                           folder / "series"),
        "report.json": lambda: write_bytes(folder / "report.json", json.dumps(noise().tolist()).encode()),
        "run/config.json": lambda: RunFolder(folder / "run").write_json(folder / "run" / "config.json",
                                                                        noise().tolist()),
        "run/labels.npy": lambda: RunFolder.write_npy(folder / "run" / "labels.npy", masks[0]),
        "run/cams.npz": lambda: RunFolder.write_npz(folder / "run" / "cams.npz", cam=volume.array),
        "final.pt": lambda: save_checkpoint(folder / "final.pt", {"model": {"weight": volume.array}}),
        "model.bin": lambda: download(server.url, folder / "download" / "model.bin"),
        "open_clip_pytorch_model.bin": lambda: cache.import_model("tiny_clip", clip),
    }
    errors = {}
    for name, write in writers.items():
        try:
            write()
            errors[name] = None
        except WriteError as error:
            errors[name] = str(error)
    server.close()
    print(json.dumps(errors))


ORIGINALS = ["volume.nii.gz", "volume.mhd", "volume.zraw", "labelmap.nii", "mask.seg.nrrd", "report.json",
             "run/config.json", "final.pt"]


def test_every_writer_on_a_full_disk_raises_naming_the_file_and_leaves_no_partial_file(tmp_path):
    pytest.importorskip("highdicom")
    from test_dicom_seg import write_series

    (tmp_path / "run").mkdir()
    for name in ORIGINALS:
        (tmp_path / name).write_bytes(b"the original " + name.encode())
    write_series(tmp_path / "series", np.random.default_rng(1).integers(0, 1000, (8, 128, 128)), np.eye(3))
    save_random_clip(tmp_path / "tiny_clip", TINY_CLIP_CONFIG)
    before = {path for path in tmp_path.rglob("*")}
    home = tmp_path / "clisc_home"
    run = run_limited("-c", f"import test_write_failures as t; t.write_each({str(tmp_path)!r})", CLISC_HOME=str(home))
    assert run.returncode == 0, run.stderr
    errors = json.loads(run.stdout.splitlines()[-1])
    for name, message in errors.items():
        assert message is not None, f"{name}: written without an error past the limit"
        assert f"{Path(name).name}" in message and "could not be written" in message, message
        assert "the disk may be full" in message, message
    for name in ORIGINALS:
        assert (tmp_path / name).read_bytes() == b"the original " + name.encode()
    left = {path for path in tmp_path.rglob("*")} - before
    # a download keeps what it fetched in NAME.part, to resume it; an import leaves nothing in the cache
    assert {path.relative_to(tmp_path).as_posix() for path in left if path.is_file()} == {"download/model.bin.part"}
    assert "model.bin.part" in errors["model.bin"] and "resume" in errors["model.bin"]
    assert not any(path.is_file() for path in home.rglob("*"))


def test_a_cohort_run_stops_at_a_failed_write_instead_of_skipping_every_case(tmp_path, monkeypatch):
    """A case that cannot be read is skipped and the others go on; a full disk is no fault of the case."""
    import clisc.cohort.run
    from clisc.cohort.options import CohortOptions
    from clisc.cohort.run import run_cohort
    from clisc.errors import WriteError
    from clisc.writers import write_failed

    images = tmp_path / "images"
    images.mkdir()
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(noise((4, 16, 16))), str(images / f"{case}.nii.gz"))
    (tmp_path / "sam.pth").write_bytes(b"never loaded")

    def full_disk(case, folder):
        raise write_failed(folder / "image.npy", "No space left on device")

    monkeypatch.setattr(clisc.cohort.run, "store_case", full_disk)
    monkeypatch.setattr(clisc.cohort.run, "check_models", lambda *args: None)  # the models are never loaded
    options = CohortOptions(clip=str(tmp_path), sam=str(tmp_path / "sam.pth"), classifier_weights=None, device="cpu")
    with pytest.raises(WriteError, match=r"a/image.npy: could not be written \(No space left on device\)"):
        run_cohort(images, "brain tumor", tmp_path / "run", options)
    assert list((tmp_path / "run" / "skipped").iterdir()) == []
