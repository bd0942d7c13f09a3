"""A CLIP folder is installed under a catalogue name only when its open_clip config describes that entry's model,
not only when its tensors fit: the activation (QuickGELU or GELU), the pixel normalisation or the causal mask
change what a model computes without changing a tensor.

Random weights: these tests show which configs are refused and that nothing is installed or pinned then; not
that any model is accurate. The full-size test uses open_clip's own ViT-B-16 and ViT-B-16-quickgelu configs,
not the files on the Hub (no network here).
"""
from __future__ import annotations

import json
import shutil

import pytest

from clisc.cli import main
from clisc.models import cache
from clisc.models.catalogue import ModelEntry, RemoteFile
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip

QUICKGELU_TINY = {**TINY_CLIP_CONFIG, "quick_gelu": True}


@pytest.fixture(scope="module")
def gelu_clip(tmp_path_factory):
    """A tiny CLIP folder with open_clip's default activation, GELU."""
    return save_random_clip(tmp_path_factory.mktemp("clip") / "gelu", TINY_CLIP_CONFIG)


@pytest.fixture
def quickgelu_entry(monkeypatch):
    """A catalogue entry 'quickgelu_clip' whose model is the tiny CLIP with QuickGELU (as OpenAI's CLIPs)."""
    entry = ModelEntry("quickgelu_clip", "clip", "tiny-quickgelu", (
        RemoteFile("http://127.0.0.1:1/open_clip_config.json", "open_clip_config.json", None, None, "test"),
        RemoteFile("http://127.0.0.1:1/open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin", None, None,
                   "test")), "MIT", "", "", open_clip_config={"model_cfg": QUICKGELU_TINY})
    monkeypatch.setattr(cache, "get_entry", lambda name: entry)
    return entry


def with_config(source, destination, edit) -> str:
    """A copy of CLIP folder ``source`` (same weights file) whose config ``edit`` changed."""
    shutil.copytree(source, destination)
    config_file = destination / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    edit(config)
    config_file.write_text(json.dumps(config))
    return str(destination)


def test_a_gelu_folder_is_refused_for_a_quickgelu_entry_and_nothing_is_pinned(clisc_home, gelu_clip,
                                                                            quickgelu_entry, tmp_path, capsys):
    assert main(["models", "import", "quickgelu_clip", str(gelu_clip)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "describes another CLIP than 'quickgelu_clip'" in error
    assert "quick_gelu: false (GELU) here, true (QuickGELU) expected" in error
    assert not cache.model_dir("quickgelu_clip").exists()

    # The same tensors under the entry's config: installed (the refusal was the config's, not the weights').
    right = with_config(gelu_clip, tmp_path / "quickgelu", lambda config: config["model_cfg"].update(quick_gelu=True))
    assert main(["models", "import", "quickgelu_clip", right]) == 0
    assert cache.is_installed(quickgelu_entry)


@pytest.mark.parametrize("edit, said", [
    (lambda c: c["model_cfg"].update(quick_gelu=True, embed_dim=32), "embed_dim: 32 here, 64 expected"),
    (lambda c: c["model_cfg"].update(quick_gelu=True) or c["model_cfg"]["text_cfg"].update(no_causal_mask=True),
     "text_cfg.no_causal_mask: true here, false expected"),
    (lambda c: c["model_cfg"].update(quick_gelu=True) or c["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5]),
     "preprocess_cfg.mean: [0.5, 0.5, 0.5] here, [0.481455, 0.457827, 0.408211] expected"),
])
def test_each_setting_that_changes_the_features_is_named(clisc_home, gelu_clip, quickgelu_entry, tmp_path, edit,
                                                         said, capsys):
    folder = with_config(gelu_clip, tmp_path / "edited", edit)
    assert main(["models", "import", "quickgelu_clip", folder]) == 2
    assert said in " ".join(capsys.readouterr().err.split())
    assert not cache.model_dir("quickgelu_clip").exists()


def test_where_a_text_tower_comes_from_is_not_compared():
    """BiomedCLIP's text tower is named by its Hub repository, which the loader points at the folder."""
    from clisc.models.catalogue import get_entry
    from clisc.models.validate import clip_config_differences, expected_clip_config

    expected = expected_clip_config(get_entry("biomedclip"))
    renamed = json.loads(json.dumps(expected))
    renamed["model_cfg"]["text_cfg"].update(hf_model_name="/local/folder", hf_tokenizer_name="/local/folder")
    assert clip_config_differences(renamed, expected) == []
    renamed["model_cfg"]["text_cfg"]["hf_pooler_type"] = "mean_pooler"
    assert clip_config_differences(renamed, expected) == [
        'text_cfg.hf_pooler_type: "mean_pooler" here, "cls_last_hidden_state_pooler" expected']


@pytest.mark.slow
def test_plain_vit_b16_is_refused_as_clip_vit_b16_and_the_quickgelu_folder_then_installs(clisc_home, tmp_path,
                                                                                          capsys):
    """The reported case, with the real catalogue entry: a full-size ViT-B-16 (GELU) folder, whose tensors are
    exactly those of ViT-B-16-quickgelu, is refused; the same weights with the quickgelu config install, and are
    not refused as "differs from the copy installed first"."""
    import open_clip

    plain = save_random_clip(tmp_path / "plain", "ViT-B-16")
    assert main(["models", "import", "clip_vit_b16", str(plain)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "describes another CLIP than 'clip_vit_b16' (ViT-B-16-quickgelu)" in error
    assert "quick_gelu: false (GELU) here, true (QuickGELU) expected" in error
    assert not cache.model_dir("clip_vit_b16").exists()

    config_file = plain / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    config["model_cfg"] = open_clip.get_model_config("ViT-B-16-quickgelu")
    config_file.write_text(json.dumps(config))
    assert main(["models", "import", "clip_vit_b16", str(plain)]) == 0
    assert sorted(p.name for p in cache.model_dir("clip_vit_b16").iterdir()) == [
        "open_clip_config.json", "open_clip_pytorch_model.bin", cache.PINS_FILE]
