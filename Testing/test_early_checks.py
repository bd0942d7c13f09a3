"""What `clisc segment` and `clisc train` check before any model loads, and the messages that name their flags.

"No model loaded" is observed, not timed: `ZeroShotSegmenter` (which loads CLIP and SAM) is replaced by a stand-in
that fails the test when it is built. The model files are real architectures with random weights (a tiny CLIP, a
random LiteMedSAM); they show which files are refused, not that any model is accurate.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from clisc import zeroshot
from clisc.cli import main
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return save_random_clip(folder / "clip", TINY_CLIP_CONFIG), save_random_sam(folder / "lite.pth", "litemedsam")


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr(zeroshot, "ZeroShotSegmenter", lambda *a, **k: pytest.fail("the models were loaded"))


def volume_file(path, array) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.float32)), str(path))
    return str(path)


@pytest.fixture
def image(tmp_path):
    return volume_file(tmp_path / "image.nii.gz", np.random.default_rng(0).random((3, 32, 32)))


def segment(image, *options) -> int:
    return main(["segment", str(image), "--prompt", "tumor", "-o", str(image).replace("image.nii.gz", "out.nii.gz"),
                 *map(str, options)])


def truncated(path):
    torch.save({"weight": torch.zeros(4096)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make, said", [
    (lambda p: p.write_text("not weights\n") and p, "a text file, not a PyTorch checkpoint"),
    (truncated, "an incomplete PyTorch archive"),
    (lambda p: torch.save(torch.nn.Linear(2, 2), p) or p, "a pickle of Python objects"),
    (lambda p: torch.save({"visual.proj": torch.zeros(2)}, p) or p, "not a Segment Anything checkpoint"),
])
def test_a_bad_sam_file_is_named_before_clip_loads(models, no_model_loads, image, tmp_path, make, said, capsys):
    clip, _ = models
    sam = make(tmp_path / "sam.pth")
    assert segment(image, "--clip", clip, "--sam", sam) == 2
    error = capsys.readouterr().err
    assert str(sam) in error and said in error


def test_a_sam_whose_tensors_do_not_fit_is_named_before_clip_loads(models, no_model_loads, image, tmp_path,
                                                                    capsys):
    clip, sam = models
    state = torch.load(sam, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "damaged.pth")
    assert segment(image, "--clip", clip, "--sam", tmp_path / "damaged.pth") == 2
    assert "not a LiteMedSAM (TinyViT) checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("damage, said", [
    (lambda folder: (folder / "open_clip_pytorch_model.bin").write_text("<html>login</html>"), "is an HTML page"),
    (lambda folder: (folder / "open_clip_config.json").unlink(), "no open_clip_config.json"),
    (lambda folder: (folder / "open_clip_config.json").write_text("{"), "not a readable open_clip config"),
])
def test_a_bad_clip_folder_is_named_before_any_model_loads(models, no_model_loads, image, tmp_path, damage, said,
                                                           capsys):
    import shutil

    clip, sam = models
    folder = shutil.copytree(clip, tmp_path / "clip")
    damage(folder)
    assert segment(image, "--clip", folder, "--sam", sam) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("array, shape", [
    (np.zeros((4, 16, 16)), "16 × 16 × 4"),
    (np.ones((1, 1, 1)), "1 × 1 × 1"),
])
def test_a_volume_without_contrast_is_refused_before_any_model_loads(clisc_home, no_model_loads, tmp_path, array,
                                                                     shape, capsys):
    """With the default models, not installed: the volume is refused before they are looked for."""
    path = volume_file(tmp_path / "image.nii.gz", array)
    assert segment(path, "--no-download") == 2
    error = capsys.readouterr().err
    assert f"no slice has any contrast (shape {shape} voxels" in error and "not an empty export or a mask" in error
    assert "not installed" not in error


def test_a_slice_range_without_contrast_says_to_choose_other_slices(clisc_home, no_model_loads, tmp_path, capsys):
    array = np.zeros((4, 16, 16))
    array[3, 4:8, 4:8] = 1
    path = volume_file(tmp_path / "image.nii.gz", array)
    assert segment(path, "--slices", "0:2", "--no-download") == 2
    error = capsys.readouterr().err
    assert "no slice in --slices 0:2 has any contrast" in error and "choose --slices" in error


def test_relevance_settings_are_named_by_their_flags(clisc_home, no_model_loads, image, capsys):
    assert segment(image, "--relevance-threshold", "2", "--relevance-smoothing", "5") == 2
    assert "--relevance-threshold 2.0 and --relevance-smoothing 5: use a threshold in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("preset, said, not_said", [
    ("accurate", "--preset fast is quicker", "minutes"),
    ("fast", "--preset fast is made for it", "--preset fast is quicker"),
    ("fast --mode every-slice", "even with --preset fast", "--preset fast is quicker"),
])
def test_the_cpu_warning_fits_the_preset_and_promises_no_time(models, image, monkeypatch, caplog, preset, said,
                                                              not_said):
    class Interrupted:
        device = torch.device("cpu")

        def __init__(self, options):
            pass

        def segment(self, *args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(zeroshot, "ZeroShotSegmenter", Interrupted)
    clip, sam = models
    with caplog.at_level(logging.WARNING):
        assert segment(image, "--clip", clip, "--sam", sam, "--preset", *preset.split()) == 130
    warning = next(r.getMessage() for r in caplog.records if "running on the CPU" in r.getMessage())
    assert said in warning and not_said not in warning and "a CUDA GPU" in warning


def test_clip_labelling_no_slice_names_the_threshold_flag(models, tmp_path, capsys):
    clip, sam = models
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    volume_file(cohort / "case1.nii.gz", np.random.default_rng(1).random((4, 24, 24)))
    code = main(["train", str(cohort), "--prompt", "tumor", "--out", str(tmp_path / "run"), "--clip", str(clip),
                 "--sam", str(sam), "--classifier-weights", "none", "--clip-threshold", "1.0", "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert "CLIP labelled no slice with confidence >= 1.0 (--clip-threshold)" in error
    assert "a lower --clip-threshold" in error
