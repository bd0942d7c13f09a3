"""Loaders build the real architectures and load checkpoints through the product's path (weights_only).

Random weights: these tests show that files in the real formats load into the real classes, that the SAM
architecture is read off the tensors and that bad files give clear errors; not that any model is accurate.
"""
from __future__ import annotations

import json

import pytest
import torch

from clisc.errors import InputError
from clisc.models import cache
from clisc.models.catalogue import CATALOGUE
from clisc.models.loaders import load_checkpoint, load_clip, load_sam, sam_architecture
from clisc.models.random_weights import (
    TINY_CLIP_CONFIG,
    save_random_clip,
    save_random_sam,
)


@pytest.fixture(scope="module")
def sam_vit_b_checkpoint(tmp_path_factory):
    return save_random_sam(tmp_path_factory.mktemp("sam") / "random_sam_vit_b.pth", "vit_b")


def test_full_size_random_sam_vit_b_round_trips(sam_vit_b_checkpoint):
    saved = torch.load(sam_vit_b_checkpoint, weights_only=True)
    sam = load_sam(sam_vit_b_checkpoint)
    assert sam_architecture(saved) == "vit_b"
    assert sum(p.numel() for p in sam.parameters()) > 90_000_000
    for name, tensor in sam.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not sam.training


def test_sam_checkpoint_wrapped_in_a_model_key_loads(tmp_path, sam_vit_b_checkpoint):
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": torch.load(sam_vit_b_checkpoint, weights_only=True), "epoch": 3}, wrapped)
    assert load_sam(wrapped).image_encoder.patch_embed.proj.weight.shape[0] == 768


@pytest.mark.parametrize("width, architecture", [(768, "vit_b"), (1024, "vit_l"), (1280, "vit_h")])
def test_sam_architecture_from_tensors(width, architecture):
    assert sam_architecture({"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16)}) == architecture


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "callback": print}, path)
    with pytest.raises(InputError, match="weights_only"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_corrupt_checkpoint(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(InputError, match="broken.pth"):
        load_sam(path)


def test_clip_checkpoint_is_not_a_sam(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"visual.conv1.weight": torch.zeros(2)}, path)
    with pytest.raises(InputError, match="not a Segment Anything checkpoint"):
        load_sam(path)


def test_clip_local_dir_loads_offline_with_its_tokenizer(tmp_path):
    folder = save_random_clip(tmp_path / "tiny_clip", TINY_CLIP_CONFIG)
    clip = load_clip(folder)
    saved = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    for name, tensor in clip.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    tokens = clip.tokenizer(["brain tumor", "left lung"])
    assert tokens.shape == (2, 77) and tokens[0].count_nonzero() > 2
    assert clip.image_size == 224 and len(clip.mean) == 3
    with torch.no_grad():
        assert clip.model.encode_text(tokens).shape == (2, 64)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(InputError, match="open_clip_config.json"):
        load_clip(tmp_path)


def test_unknown_name_lists_the_catalogue(clisc_home):
    with pytest.raises(InputError, match="sam_vit_b"):
        load_sam("sam_vit_z")


def test_catalogue_model_not_installed_says_how_to_get_it(clisc_home):
    with pytest.raises(InputError, match="clisc models download sam_vit_b"):
        load_sam("sam_vit_b")


def test_catalogue_entries_are_complete():
    names = [entry.name for entry in CATALOGUE]
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "biomedclip", "clip_vit_b16", "clip_vit_b32",
            "resnet50_imagenet"} <= set(names)
    assert len(names) == len(set(names))
    for entry in CATALOGUE:
        assert entry.licence and entry.files
        for remote in entry.files:
            assert remote.url.startswith("https://")
            assert remote.sha256 is None or (len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0)
            assert remote.sha256_source


def test_import_checks_the_published_hash_and_keeps_nothing_on_mismatch(clisc_home, sam_vit_b_checkpoint):
    """Random weights cannot match the published SAM hash: the import must refuse them and keep nothing."""
    entry = next(e for e in CATALOGUE if e.name == "sam_vit_b")
    if entry.files[0].sha256 is None:
        pytest.skip("the catalogue has no published sha256 for sam_vit_b")
    with pytest.raises(InputError, match="sha256"):
        cache.import_model("sam_vit_b", sam_vit_b_checkpoint)
    assert not any(p.is_file() for p in cache.model_dir("sam_vit_b").glob("*"))


def test_import_pins_an_unpublished_hash_and_then_loads(clisc_home, sam_vit_b_checkpoint, tmp_path):
    """An entry without a published hash is pinned on first import; a different file is then refused."""
    entry = next((e for e in CATALOGUE if e.family == "sam" and e.files[0].sha256 is None), None)
    if entry is None:
        pytest.skip("every SAM entry has a published hash")
    path = cache.import_model(entry.name, sam_vit_b_checkpoint)
    pins = json.loads((cache.model_dir(entry.name) / cache.PINS_FILE).read_text())
    assert pins[entry.files[0].filename] == cache.file_sha256(path)
    assert load_sam(entry.name).image_encoder.patch_embed.proj.weight.shape[0] == 768

    other = save_random_sam(tmp_path / "other.pth", "vit_b", seed=1)
    path.unlink()
    with pytest.raises(InputError, match="sha256"):
        cache.import_model(entry.name, other)
