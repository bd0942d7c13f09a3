"""The `clisc` command line: segment end to end, models, and bad input (exit 2, nothing written)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from clisc.cli import main
from clisc.models import cache
from clisc.models.catalogue import ModelEntry, RemoteFile
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam
from conftest import shared_data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return save_random_clip(folder / "tiny_clip", TINY_CLIP_CONFIG), save_random_sam(folder / "sam_b.pth")


@pytest.fixture
def small_mri(tmp_path):
    """Four slices of a real BraTS FLAIR, cropped, written with their geometry."""
    image = sitk.ReadImage(str(shared_data("brats2015/pat0001/flair.nii.gz")))
    crop = image[40:200, 40:200, 70:74]
    path = tmp_path / "flair_crop.nii.gz"
    sitk.WriteImage(crop, str(path))
    return path


def test_clisc_help_lists_the_commands():
    run = subprocess.run([sys.executable, "-m", "clisc.cli", "--help"], capture_output=True, encoding="utf-8", errors="replace")
    assert run.returncode == 0
    for command in ("segment", "train", "apply", "models"):
        assert command in run.stdout


def test_segment_end_to_end_with_full_size_random_sam(tmp_path, small_mri, models, capsys):
    """Real CLI path: files in, the real loaders (full-size SAM vit_b checkpoint, open_clip folder), files out."""
    clip, sam = models
    output, saliency, report = tmp_path / "out.seg.nrrd", tmp_path / "saliency.nii.gz", tmp_path / "run.json"
    code = main(["segment", str(small_mri), "--prompt", "brain tumor", "--prompt", "edema", "-o", str(output),
                 "--clip", str(clip), "--sam", str(sam), "--preset", "fast", "--slices", "1:2",
                 "--saliency-out", str(saliency), "--report", str(report), "--seed", "3"])
    assert code == 0
    segmentation = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in segmentation["segments"]] == ["brain tumor", "edema"]
    reference = sitk.ReadImage(str(small_mri))
    assert segmentation["voxels"].shape[-3:] == reference.GetSize()
    np.testing.assert_allclose(segmentation["ijkToLPS"][:3, 3], reference.GetOrigin(), atol=1e-4)
    for path in (saliency, tmp_path / "saliency_2.nii.gz"):
        written = sitk.ReadImage(str(path))
        assert written.GetSize() == reference.GetSize()
        assert np.allclose(written.GetDirection(), reference.GetDirection())
        values = sitk.GetArrayViewFromImage(written)
        assert values[1:3].max() > 0 and values[[0, 3]].max() == 0
    facts = json.loads(report.read_text())
    assert facts["options"]["seed"] == 3 and facts["options"]["slices"] == "1:2"
    assert facts["slices_embedded"] == 2
    assert len(facts["models"]["sam"]["sha256"]["sam_b.pth"]) == 64
    assert "open_clip_pytorch_model.bin" in facts["models"]["clip"]["sha256"]
    assert "brain tumor:" in capsys.readouterr().out


def test_ctrl_c_writes_nothing(tmp_path, small_mri, models, monkeypatch):
    from clisc import zeroshot

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zeroshot.ZeroShotSegmenter, "segment", interrupted)
    clip, sam = models
    output = tmp_path / "out.nii.gz"
    code = main(["segment", str(small_mri), "--prompt", "tumor", "-o", str(output), "--clip", str(clip),
                 "--sam", str(sam), "--report", str(tmp_path / "r.json")])
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flair_crop.nii.gz"]


@pytest.mark.parametrize("arguments, message", [
    (["--prompt", "   "], "empty"),
    (["--prompt", "x" * 10_000], "characters"),
    (["--prompt", "tumor", "--slices", "3:1"], "--slices"),
    (["--prompt", "tumor", "--axis", "k", "--clip", "no_such_model"], "no_such_model"),
    (["--prompt", "tumor", "--components", "0"], "--components 0: use a whole number of 1 or more"),
    (["--prompt", "tumor", "--profile", "kidney"], "unknown profile 'kidney'; use auto or one of tumor, lesion, paired-organ"),
    (["--prompt", "tumor", "--keep-3d", "biggest"], "use largest, all, or a size in mm³"),
    (["--prompt", "tumor", "--beta", "0"], "--beta 0.0: use a number above 0"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, small_mri, arguments, message, capsys):
    output = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(small_mri), "-o", str(output), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_bad_input_and_outputs_exit_2(tmp_path, capsys):
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)), str(image))
    cases = [
        (["segment", str(tmp_path / "missing.nii.gz"), "--prompt", "x", "-o", str(tmp_path / "a.nii.gz")],
         "no such file"),
        (["segment", str(image), "--prompt", "x", "-o", str(image)], "overwrite the input"),
        (["segment", str(image), "--prompt", "x", "-o", str(tmp_path / "out.png")], "unsupported output"),
        (["segment", str(image), "--prompt", "x", "-o", str(tmp_path / "nowhere" / "a.nii.gz")], "does not exist"),
    ]
    existing = tmp_path / "existing.seg.nrrd"
    existing.write_text("keep me")
    cases.append((["segment", str(image), "--prompt", "x", "-o", str(existing)], "--overwrite"))
    for arguments, message in cases:
        assert main(arguments) == 2, arguments
        assert message in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.seg.nrrd", "image.nrrd"]


def test_models_list_import_and_path(clisc_home, models, capsys):
    _, sam = models
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "sam_vit_b" in listing and "biomedclip" in listing and "Apache-2.0" in listing
    assert main(["models", "import", "medsam_vit_b", str(sam)]) == 0
    installed = capsys.readouterr().out.strip()
    assert main(["models", "path", "medsam_vit_b"]) == 0
    assert capsys.readouterr().out.strip() == installed
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("medsam_vit_b"))
    assert "pinned" in row and " yes " in row


def test_download_without_network_says_where_to_fetch_and_how_to_import(clisc_home, monkeypatch, capsys):
    entry = ModelEntry("offline_test", "sam", "vit_b", (RemoteFile(
        "http://127.0.0.1:1/sam.pth", "sam.pth", None, None, "test"),), "MIT", "", "")
    monkeypatch.setattr(cache, "get_entry", lambda name: entry)
    assert main(["models", "download", "offline_test"]) == 2
    error = capsys.readouterr().err
    assert "http://127.0.0.1:1/sam.pth" in error and "clisc models import offline_test" in error
    assert not any(cache.model_dir("offline_test").glob("sam.pth"))


@pytest.mark.parametrize("option, value, message", [
    ("--saliency-out", "saliency.png", "--saliency-out (a volume file) must end with"),
    ("--saliency-out", "saliency.txt", "--saliency-out (a volume file) must end with"),
    ("--report", "report.json", "is a folder"),
])
def test_every_output_is_checked_before_any_model_loads(tmp_path, option, value, message, capsys):
    """A bad output path fails first (the CLIP named here does not exist, so reaching the models would say so)."""
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.float32)), str(image))
    (tmp_path / "report.json").mkdir()
    output = tmp_path / "out.seg.nrrd"
    code = main(["segment", str(image), "--prompt", "x", "-o", str(output), "--clip", "no_such_clip",
                 option, str(tmp_path / value), "--overwrite"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "no_such_clip" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nrrd", "report.json"]


def test_a_repeated_prompt_is_segmented_once_with_a_warning(tmp_path, small_mri, models, caplog):
    clip, sam = models
    output, report = tmp_path / "out.seg.nrrd", tmp_path / "run.json"
    code = main(["segment", str(small_mri), "--prompt", "tumor", "--prompt", "Tumor ", "-o", str(output),
                 "--clip", str(clip), "--sam", str(sam), "--preset", "fast", "--slices", "1:1",
                 "--report", str(report)])
    assert code == 0
    assert [s["name"] for s in slicerio.read_segmentation(str(output))["segments"]] == ["tumor"]
    assert "given more than once" in caplog.text


def test_ctrl_c_in_train_says_what_is_kept_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from clisc.cohort import run as cohort_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cohort_run, "run_cohort", interrupted)
    code = main(["train", str(tmp_path), "--prompt", "tumor", "--out", str(tmp_path / "run1")])
    error = capsys.readouterr().err
    assert code == 130
    assert "keeps every finished stage" in error and "--resume" in error and "nothing was written" not in error


def test_the_fast_preset_help_says_what_it_does():
    run = subprocess.run([sys.executable, "-m", "clisc", "segment", "--help"], capture_output=True, encoding="utf-8")
    assert "the same M2IB saliency" in " ".join(run.stdout.split())
    assert "cheaper saliency" not in run.stdout
