"""Loaders build the real architectures and load checkpoints through the product's path (weights_only); the cache
installs and pins only files that are what their catalogue entry says.

Random weights: these tests show that files in the real formats load into the real classes, that the SAM
architecture is read off the tensors and that bad files give clear errors; not that any model is accurate.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch

from clisc.cli import main
from clisc.errors import InputError
from clisc.models import cache
from clisc.models.catalogue import CATALOGUE, ModelEntry, RemoteFile
from clisc.models.loaders import load_checkpoint, load_clip, load_sam, sam_architecture
from clisc.models.random_weights import (
    TINY_CLIP_CONFIG,
    save_random_clip,
    save_random_sam,
)
from clisc.models.validate import check_weights

DRIVE_PAGE = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
              b"<form action=\"https://drive.usercontent.google.com/download\">Download anyway</form></body></html>")


@pytest.fixture(scope="module")
def sam_vit_b_checkpoint(tmp_path_factory):
    return save_random_sam(tmp_path_factory.mktemp("sam") / "random_sam_vit_b.pth", "vit_b")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP folder in open_clip's local-dir layout (tiny real open_clip model, random weights)."""
    return save_random_clip(tmp_path_factory.mktemp("clip") / "tiny_clip", TINY_CLIP_CONFIG)


@pytest.fixture(autouse=True)
def clip_vit_b16_is_the_tiny_clip(monkeypatch):
    """In this file the catalogue's clip_vit_b16 stands for the tiny CLIP: its entry expects `TINY_CLIP_CONFIG`
    (test_clip_config.py checks the full-size entry)."""
    real = cache.get_entry
    tiny = replace(real("clip_vit_b16"), open_clip_config={"model_cfg": TINY_CLIP_CONFIG})
    monkeypatch.setattr(cache, "get_entry", lambda name: tiny if name == "clip_vit_b16" else real(name))


def installed_files(name: str) -> list:
    """Every file under the model's cache folder: final files, pins, staged or partial downloads."""
    folder = cache.model_dir(name)
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def flip_one_byte(source, destination):
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the middle of the tensor data: the file still loads
    destination.write_bytes(bytes(data))
    return destination


def fake_entry(monkeypatch, *files: RemoteFile, family="clip", architecture="tiny") -> ModelEntry:
    """Make `cache` see a catalogue entry 'test_model' with these files."""
    entry = ModelEntry("test_model", family, architecture, files, "MIT", "", "",
                       open_clip_config={"model_cfg": TINY_CLIP_CONFIG} if family == "clip" else None)
    monkeypatch.setattr(cache, "get_entry", lambda name: entry)
    return entry


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


def test_pickled_code_is_refused_for_safety(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "callback": print}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "Python objects (print;" in message and "refused for safety" in message
    assert "weights_only" not in message


def test_pickled_module_is_refused_for_safety_not_pointed_at_the_unsafe_option(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(InputError) as info:
        load_sam(path)
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message and "pickled model" in message
    assert "could run code" in message and "state_dict()" in message and "weights_only" not in message


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.jit is deprecated
def test_torchscript_archive_is_refused_for_safety(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(InputError, match="TorchScript archive.*refused for safety") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize("content, said", [
    (b"", "the file is empty"),
    (b"hello world\n", "a text file, not a PyTorch checkpoint (it begins 'hello world')"),
    (DRIVE_PAGE, "is an HTML page, not a checkpoint (Google Drive's download-confirmation page?)"),
])
def test_a_local_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, said):
    """--sam FILE: an InputError naming the file (no KeyError traceback from torch's unpickler)."""
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        load_sam(path)
    assert str(path) in str(info.value) and said in str(info.value)


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


def test_clip_folder_with_pickled_weights_is_refused_for_safety(tmp_path, tiny_clip):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip, folder)
    torch.save(torch.nn.Linear(2, 2), folder / "open_clip_pytorch_model.bin")
    with pytest.raises(InputError, match="open_clip_pytorch_model.bin: a pickle of Python objects") as info:
        load_clip(folder)
    assert "refused for safety" in str(info.value) and "weights_only" not in str(info.value)


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


def test_sam_entries_publish_size_and_md5_prefix():
    for name, size, md5 in [("sam_vit_b", 375_042_383, "01ec64"), ("sam_vit_l", 1_249_524_607, "0b3195"),
                            ("sam_vit_h", 2_564_550_879, "4b8939")]:
        remote = next(e for e in CATALOGUE if e.name == name).files[0]
        assert (remote.size, remote.md5_prefix) == (size, md5) and md5 in remote.filename


def test_hub_files_are_pinned_to_a_commit():
    for entry in CATALOGUE:
        for remote in entry.files:
            assert "/resolve/main/" not in remote.url, remote.url


def test_a_random_vit_b_is_not_meta_s_sam_vit_b(clisc_home, sam_vit_b_checkpoint, capsys):
    """The right architecture, but not the published file: its size differs, and nothing is kept."""
    assert main(["models", "import", "sam_vit_b", str(sam_vit_b_checkpoint)]) == 2
    error = capsys.readouterr().err
    assert str(sam_vit_b_checkpoint) in error and "instead of 375042383" in error and "Nothing was imported" in error
    assert installed_files("sam_vit_b") == []


def test_import_pins_an_unpublished_hash_and_then_loads(clisc_home, sam_vit_b_checkpoint, tmp_path):
    """An entry without a published hash is pinned on first import; a different file is then refused."""
    path = cache.import_model("medsam_vit_b", sam_vit_b_checkpoint)
    pins = json.loads((cache.model_dir("medsam_vit_b") / cache.PINS_FILE).read_text())
    assert pins == {"medsam_vit_b.pth": cache.file_sha256(path)}
    assert load_sam("medsam_vit_b").image_encoder.patch_embed.proj.weight.shape[0] == 768

    other = save_random_sam(tmp_path / "other.pth", "vit_b", seed=1)
    path.unlink()
    with pytest.raises(InputError, match="sha256 .* instead of .*clisc models forget medsam_vit_b"):
        cache.import_model("medsam_vit_b", other)
    assert installed_files("medsam_vit_b") == [cache.PINS_FILE]


def test_truncated_checkpoint_is_refused_and_nothing_pinned(clisc_home, sam_vit_b_checkpoint, tmp_path, capsys):
    truncated = tmp_path / "truncated.pth"
    with open(sam_vit_b_checkpoint, "rb") as whole:
        truncated.write_bytes(whole.read(100_000))
    assert main(["models", "import", "sam_vit_b", str(truncated)]) == 2
    error = capsys.readouterr().err
    assert str(truncated) in error and "truncated download or copy" in error and "Fetch it again" in error
    assert installed_files("sam_vit_b") == []


@pytest.mark.parametrize("content, said", [
    (b"hello\n", "a text file, not a PyTorch checkpoint"),
    (DRIVE_PAGE, "is an HTML page, not a checkpoint (Google Drive's download-confirmation page?)"),
    (b"<html><body><form>Proxy login: user name, password</form></body></html>", "(a login page, from a proxy"),
    (b"<!DOCTYPE html><html><title>404 - Hugging Face</title>Repository not found</html>", "Repository not found"),
])
def test_import_of_a_file_that_is_no_checkpoint_pins_nothing(clisc_home, tmp_path, capsys, content, said):
    path = tmp_path / "download.pth"
    path.write_bytes(content)
    assert main(["models", "import", "sam_vit_h", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and said in error
    assert installed_files("sam_vit_h") == []


def test_wrong_architecture_is_refused_and_named(clisc_home, tmp_path, capsys):
    """Right tensor names, wrong shapes: a vit_b-wide file under the name sam_vit_h (small: shapes are all it takes)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        names = sam_model_registry["vit_h"]().state_dict()
    state_dict = {name: torch.zeros(1) for name in names}
    state_dict["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state_dict, path)
    assert main(["models", "import", "sam_vit_h", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "not a Segment Anything vit_h checkpoint (it holds Segment Anything vit_b weights)" in error
    assert "size mismatch" in error
    assert installed_files("sam_vit_h") == []


def test_classifier_weights_are_checked_against_torchvision_resnet50(tmp_path):
    from torchvision.models import resnet50

    entry = next(e for e in CATALOGUE if e.name == "resnet50_imagenet")
    good = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), good)
    check_weights(entry, good)
    bad = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(InputError, match="other.pth: not an ImageNet resnet50 checkpoint.*Missing key"):
        check_weights(entry, bad)


def test_clip_folder_imports_validated_then_pinned(clisc_home, tiny_clip, capsys):
    assert main(["models", "import", "clip_vit_b16", str(tiny_clip)]) == 0
    folder = cache.model_dir("clip_vit_b16")
    assert capsys.readouterr().out.strip() == str(folder)
    assert installed_files("clip_vit_b16") == ["open_clip_config.json", "open_clip_pytorch_model.bin", cache.PINS_FILE]
    pins = json.loads((folder / cache.PINS_FILE).read_text())
    assert pins["open_clip_pytorch_model.bin"] == cache.file_sha256(tiny_clip / "open_clip_pytorch_model.bin")
    assert cache.installed_size("clip_vit_b16") == sum(p.stat().st_size for p in tiny_clip.iterdir())


def test_tampered_file_is_refused_by_its_pin(clisc_home, tiny_clip, tmp_path):
    cache.import_model("clip_vit_b16", tiny_clip)
    folder = cache.model_dir("clip_vit_b16")
    pins_before = (folder / cache.PINS_FILE).read_text()
    weights_before = (folder / "open_clip_pytorch_model.bin").read_bytes()
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_clip, tampered)
    flip_one_byte(tiny_clip / "open_clip_pytorch_model.bin", tampered / "open_clip_pytorch_model.bin")
    with pytest.raises(InputError) as info:
        cache.import_model("clip_vit_b16", tampered)
    message = str(info.value)
    assert str(tampered / "open_clip_pytorch_model.bin") in message and "pinned" in message
    assert "clisc models forget clip_vit_b16" in message and "Nothing was imported" in message
    assert (folder / cache.PINS_FILE).read_text() == pins_before
    assert (folder / "open_clip_pytorch_model.bin").read_bytes() == weights_before
    assert not (folder / cache.INCOMING).exists()


def test_tampered_file_is_refused_by_its_published_hash(clisc_home, tiny_clip, tmp_path, monkeypatch):
    weights = tiny_clip / "open_clip_pytorch_model.bin"
    fake_entry(monkeypatch,
               RemoteFile("https://example.org/c.json", "open_clip_config.json", None, None, "test"),
               RemoteFile("https://example.org/w.bin", "open_clip_pytorch_model.bin", weights.stat().st_size,
                          cache.file_sha256(weights), "test"))
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_clip, tampered)
    flip_one_byte(weights, tampered / "open_clip_pytorch_model.bin")
    with pytest.raises(InputError, match="sha256 .* instead of .*not the official file.*https://example.org/w.bin"):
        cache.import_model("test_model", tampered)
    assert installed_files("test_model") == []
    cache.import_model("test_model", tiny_clip)
    assert installed_files("test_model") == ["open_clip_config.json", "open_clip_pytorch_model.bin", cache.PINS_FILE]


def test_md5_prefix_is_checked_on_import(clisc_home, tiny_clip, monkeypatch):
    weights = tiny_clip / "open_clip_pytorch_model.bin"
    md5 = hashlib.md5(weights.read_bytes()).hexdigest()
    wrong = "000000" if not md5.startswith("000000") else "ffffff"
    config = RemoteFile("https://example.org/c.json", "open_clip_config.json", None, None, "test")

    def weights_with(md5_prefix):
        return RemoteFile("https://example.org/w.bin", weights.name, None, None, "test", md5_prefix=md5_prefix)

    fake_entry(monkeypatch, config, weights_with(wrong))
    with pytest.raises(InputError, match=f"md5 {md5} does not start with {wrong}"):
        cache.import_model("test_model", tiny_clip)
    assert installed_files("test_model") == []
    fake_entry(monkeypatch, config, weights_with(md5[:6]))
    cache.import_model("test_model", tiny_clip)
    assert "open_clip_pytorch_model.bin" in installed_files("test_model")


def test_failed_multi_file_import_leaves_nothing(clisc_home, tiny_clip, tmp_path):
    """A CLIP folder whose weights belong to another model: no file, no pin is kept."""
    source = tmp_path / "clip"
    shutil.copytree(tiny_clip, source)
    other = save_random_clip(tmp_path / "other", {**TINY_CLIP_CONFIG, "embed_dim": 32})
    shutil.copy(other / "open_clip_pytorch_model.bin", source)
    with pytest.raises(InputError) as info:
        cache.import_model("clip_vit_b16", source)
    message = str(info.value)
    assert str(source / "open_clip_pytorch_model.bin") in message and "does not fit the CLIP model" in message
    assert "size mismatch" in message
    assert installed_files("clip_vit_b16") == []


def test_a_multi_file_entry_needs_a_folder(clisc_home, tiny_clip):
    with pytest.raises(InputError, match="has several files .*give the folder"):
        cache.import_model("clip_vit_b16", tiny_clip / "open_clip_pytorch_model.bin")
    assert installed_files("clip_vit_b16") == []


def test_forget_removes_files_and_pins(clisc_home, tiny_clip, capsys):
    cache.import_model("clip_vit_b16", tiny_clip)
    folder = cache.model_dir("clip_vit_b16")
    assert main(["models", "forget", "clip_vit_b16"]) == 0
    printed = capsys.readouterr().out
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin", cache.PINS_FILE):
        assert f"removed {folder / name}" in printed
    assert not folder.exists()
    assert main(["models", "forget", "clip_vit_b16"]) == 0
    assert "not installed; nothing removed" in capsys.readouterr().out
    assert main(["models", "forget", "sam_vit_z"]) == 2
    assert "unknown model 'sam_vit_z'" in capsys.readouterr().err


def test_remove_model_returns_what_it_removed(clisc_home, tiny_clip):
    cache.import_model("clip_vit_b16", tiny_clip)
    partial = cache.model_dir("clip_vit_b16") / cache.INCOMING / "open_clip_pytorch_model.bin.part"
    partial.parent.mkdir()
    partial.write_bytes(b"half")
    removed = cache.remove_model("clip_vit_b16")
    assert [p.name for p in removed] == ["open_clip_pytorch_model.bin.part", "open_clip_config.json",
                                         "open_clip_pytorch_model.bin", cache.PINS_FILE]
    assert cache.installed_size("clip_vit_b16") == 0 and cache.remove_model("clip_vit_b16") == []


def test_list_shows_published_or_installed_sizes(clisc_home, tiny_clip, capsys):
    cache.import_model("clip_vit_b16", tiny_clip)
    assert main(["models", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "375 MB published" in rows["sam_vit_b"] and "2.56 GB published" in rows["sam_vit_h"]
    assert "103 MB published" in rows["resnet50_imagenet"]
    megabytes = cache.installed_size("clip_vit_b16") / 1e6
    assert f"{megabytes:.0f} MB installed" in rows["clip_vit_b16"] and " yes " in rows["clip_vit_b16"]
    assert " ? " in rows["clip_vit_b32"]
