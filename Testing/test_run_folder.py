"""The cohort run folder's layout (`RunFolder`), the case store that keeps the cohort on disk, the classifier's
training set written case by case, list files, and classifier checkpoints.

Small synthetic arrays: these tests show where files go, that what is read back is what was written, and that
the case-by-case classifier set is exactly the in-memory AMDA rule; they say nothing about accuracy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clisc.cohort.amda import amda_masked_copies
from clisc.cohort.case_store import SliceFile, TrainingPairs, open_case, store_case
from clisc.cohort.cases import Case, body_mask, preprocess, read_case_list, read_list_column
from clisc.cohort.classifier import build_classifier
from clisc.cohort.classifier_data import classifier_training_set, resized
from clisc.cohort.run_folder import FOLDERS, RunFolder
from clisc.errors import InputError
from clisc.volume import Volume
from clisc.writers import write_volume


def oblique_volume(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    array = np.zeros((9, 20, 24), np.float32)
    array[2:8, 3:17, 4:21] = rng.normal(100, 10, (6, 14, 17))
    array[4:6, 8:12, 9:14] += 80
    a = np.radians(20)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1.2, 0.9, 2.5])
    matrix[:3, 3] = (10, -20, 30)
    return Volume(array, matrix)


def test_a_run_folder_names_every_path_and_records_steps_and_skipped_cases(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert not folder.is_run() and not folder.is_finished()
    with pytest.raises(InputError, match="not a CLISC run folder.*run `clisc train` first"):
        folder.config()
    with pytest.raises(InputError, match="not a finished CLISC run.*--resume"):
        folder.require_finished()
    folder.create()
    assert sorted(p.name for p in folder.path.iterdir()) == sorted(FOLDERS)
    folder.write_json(folder.config_file, {"cohort": str(tmp_path), "prompt": "brain tumor"})
    assert folder.is_run() and folder.config()["prompt"] == "brain tumor" and not folder.is_finished()
    assert not folder.is_done("cams")
    folder.mark_done("cams")
    assert folder.is_done("cams")
    folder.skip("pat1", tmp_path / "pat1.nii.gz", "load", "InputError: unreadable")
    assert folder.skipped() == {"pat1": {"case_id": "pat1", "path": str(tmp_path / "pat1.nii.gz"), "stage": "load",
                                         "reason": "InputError: unreadable"}}
    assert folder.result("pat1", "prediction") == folder.prediction("pat1") == folder.predictions / "pat1.nii.gz"
    assert folder.result("pat1", "pseudo_label") == folder.path / "pseudo_labels" / "pat1.nii.gz"
    with pytest.raises(InputError, match="result 'mask': use one of pseudo_label, prediction"):
        folder.result("pat1", "mask")


def test_a_killed_classifier_scratch_file_is_removed_on_resumption(tmp_path):
    folder = RunFolder(tmp_path)
    folder.create()
    for amda in (False, True):
        folder.classifier_slices(amda).write_bytes(b"\0" * 10)
    kept = folder.classifier(amda=False)
    kept.write_bytes(b"weights")
    assert sorted(folder.remove_partial_files()) == sorted(folder.classifier_slices(a) for a in (False, True))
    assert kept.read_bytes() == b"weights"


def test_a_stored_case_reads_back_what_was_pre_processed_on_its_grid(tmp_path):
    volume = oblique_volume()
    write_volume(tmp_path / "case.nii.gz", volume)
    case = Case("case", tmp_path / "case.nii.gz")
    stored = store_case(case, tmp_path / "store" / "case")
    reopened = open_case(case, tmp_path / "store" / "case")
    image, crop = preprocess(volume)
    for item in (stored, reopened):
        assert item.crop == crop and item.shape == volume.array.shape
        np.testing.assert_array_equal(item.image, image)
        np.testing.assert_array_equal(item.body, body_mask(volume.array)[crop])
        np.testing.assert_allclose(item.reference().ijk_to_ras, volume.ijk_to_ras, atol=1e-5)
    assert isinstance(reopened.image, np.memmap) and not reopened.image.flags.writeable
    np.testing.assert_array_equal(reopened.slices()[3], (np.round(255 * (image[3] - image[3].min())
                                                                  / np.ptp(image[3])).astype(np.uint8)))
    label = np.zeros(image.shape, bool)
    label[2:4, 5:9, 6:12] = True
    np.save(tmp_path / "label.npy", label)
    pairs = TrainingPairs([reopened], [tmp_path / "label.npy"])
    pair_image, pair_label = pairs[0]
    assert len(pairs) == 1 and isinstance(pair_label, np.memmap)
    np.testing.assert_array_equal(pair_image, image)
    np.testing.assert_array_equal(pair_label, label)


def test_a_slice_file_reads_only_the_rows_asked_for(tmp_path):
    slices = np.random.default_rng(0).integers(0, 256, (7, 5, 5), dtype=np.uint8)
    (tmp_path / "slices.u8").write_bytes(slices.tobytes())
    rows = SliceFile(tmp_path / "slices.u8", 7, 5)
    assert len(rows) == 7
    np.testing.assert_array_equal(rows[np.array([5, 1, 1])], slices[[5, 1, 1]])
    assert not isinstance(rows[np.array([0])], np.memmap)  # a copy: the file is unmapped after each read


@pytest.fixture
def labelled_cases(tmp_path):
    """Two stored cases with CLIP slice labels (some unsure) and first-round CAMs."""
    folder = RunFolder(tmp_path / "run")
    folder.create()
    items, rng = [], np.random.default_rng(1)
    for n, labels in enumerate(([1, 1, 0, -1, 0, 1], [0, 1, 1, 1, -1, 0])):  # 6 slices in the body's box
        volume = oblique_volume(seed=n)
        write_volume(tmp_path / f"case{n}.nii.gz", volume)
        item = store_case(Case(f"case{n}", tmp_path / f"case{n}.nii.gz"), folder.preprocessed(f"case{n}"))
        folder.write_json(folder.slice_labels(item.case_id), labels)
        cam = rng.random(item.image.shape).astype(np.float32)
        mask = cam > 0.7
        mask[::3] = False  # abnormal slices without a CAM mask get a random rectangle instead
        folder.write_npz(folder.cams(item.case_id, amda=False), cam=cam.astype(np.float16), mask=mask,
                         positive=mask.any(axis=(1, 2)))
        items.append(item)
    return folder, items


def test_the_classifier_set_written_case_by_case_is_the_in_memory_amda_rule(labelled_cases, tmp_path):
    folder, items = labelled_cases
    size = 16
    images, labels, cams, masks = [], [], [], []
    for item in items:
        slice_labels = np.array(json.loads(folder.slice_labels(item.case_id).read_text()))
        keep = slice_labels >= 0
        images.append(resized(item.classifier_slices()[keep], size).round().astype(np.uint8))
        labels.append(slice_labels[keep])
        saved = np.load(folder.cams(item.case_id, amda=False))
        cams.append(resized(saved["cam"][keep], size))
        masks.append(resized(saved["mask"][keep], size, "nearest") > 0.5)
    images, labels = np.concatenate(images), np.concatenate(labels)
    expected = amda_masked_copies(images, np.concatenate(cams), np.concatenate(masks), labels,
                                  np.random.default_rng(7))
    assert (expected != images).any(axis=(1, 2)).sum() == len(images)  # every copy is masked somewhere

    plain, plain_labels = classifier_training_set(folder, items, False, tmp_path / "plain.u8", size, seed=7)
    np.testing.assert_array_equal(plain[np.arange(len(plain))], images)
    np.testing.assert_array_equal(plain_labels, labels)
    both, both_labels = classifier_training_set(folder, items, True, tmp_path / "amda.u8", size, seed=7)
    assert len(both) == 2 * len(images) == len(both_labels) and not (tmp_path / "amda.u8.copies").exists()
    np.testing.assert_array_equal(both[np.arange(len(images))], images)
    np.testing.assert_array_equal(both[np.arange(len(images), 2 * len(images))], expected)
    np.testing.assert_array_equal(both_labels, np.concatenate([labels, labels]))


def test_list_files_give_the_column_their_header_names_or_the_first(tmp_path):
    (tmp_path / "a.csv").write_text("split,Case_ID\ntest,pat1\n\ntest, pat2 \n")
    (tmp_path / "b.csv").write_text("pat1,x\npat2,y\n")
    (tmp_path / "c.txt").write_text("# held out\npat1\n\n  pat2\n")
    (tmp_path / "d.csv").write_text("id,Image\n1,scans/a.nii.gz\n")
    assert read_case_list(tmp_path / "a.csv") == ["pat1", "pat2"]
    assert read_case_list(tmp_path / "b.csv") == ["pat1", "pat2"]
    assert read_case_list(tmp_path / "c.txt") == ["pat1", "pat2"]
    assert read_list_column(tmp_path / "d.csv", ("image", "path")) == ["scans/a.nii.gz"]
    # as Excel's "CSV UTF-8" saves it: a byte order mark before the header, and a path that is not ASCII
    (tmp_path / "f.csv").write_bytes("\ufeffimage\nscans/Müller/t1.nii.gz\n".encode("utf-8"))
    assert read_list_column(tmp_path / "f.csv", ("image", "path")) == ["scans/Müller/t1.nii.gz"]
    (tmp_path / "e.csv").write_text("case_id\n")
    with pytest.raises(InputError, match="--holdout-split .*e.csv: lists no case id"):
        read_case_list(tmp_path / "e.csv", "--holdout-split")


def test_a_classifier_checkpoint_continues_with_its_head_an_imagenet_one_gets_a_new_head(tmp_path):
    trained = build_classifier(seed=1)
    torch.save(trained.state_dict(), tmp_path / "classifier.pt")
    continued = build_classifier(tmp_path / "classifier.pt", seed=2)
    assert all(torch.equal(value, continued.state_dict()[name]) for name, value in trained.state_dict().items())

    from clisc.torchvision_compat import import_torchvision

    imagenet = import_torchvision().models.resnet50(weights=None).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pt")
    model = build_classifier(tmp_path / "imagenet.pt", seed=2)
    assert torch.equal(model.state_dict()["conv1.weight"], imagenet["conv1.weight"])
    assert model.fc[-1].out_features == 2
    assert torch.equal(model.fc[-1].weight, build_classifier(seed=2).fc[-1].weight)
