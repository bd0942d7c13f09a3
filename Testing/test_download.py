"""Tests of clisc.models.download, and of the cache's downloads, against a local HTTP server on 127.0.0.1 (no
external network).

The server serves a 3 MB random file (or the files it is given), honours ``Range: bytes=N-`` (or ignores it, like
servers without range support), logs the Range header of every request, and can cut the first response short to
simulate a dropped connection.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clisc.errors import Cancelled, InputError
from clisc.models import cache
from clisc.models.catalogue import ModelEntry, RemoteFile
from clisc.models.download import ChecksumError, DownloadError, download
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip
from clisc.progress import CancelToken

DATA = random.Random(0).randbytes(3 * 1024 * 1024 + 123)
DATA_SHA256 = hashlib.sha256(DATA).hexdigest()
DATA_MD5 = hashlib.md5(DATA).hexdigest()
HINT = "clisc models import tiny-sam /path/to/model.bin"
DRIVE_PAGE = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
              b"Google Drive can't scan this file for viruses.<form action=\"https://drive.usercontent.google.com/"
              b"download\"><input type=\"submit\" value=\"Download anyway\"></form></body></html>")


class Server:
    """A threaded HTTP server serving ``files`` (path: bytes; default DATA at /model.bin); 404 for other paths."""

    def __init__(self, honour_range: bool = True, drop_first_after: int | None = None,
                 files: dict[str, bytes] | None = None) -> None:
        self.ranges: list[str | None] = []
        self.honour_range = honour_range
        self.drop_first_after = drop_first_after
        self.files = files or {"/model.bin": DATA}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if requested and server.honour_range:
                    start = int(requested[len("bytes="):].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drop_first_after is not None:
                    body, server.drop_first_after = body[: server.drop_first_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.root}/model.bin"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs) -> Server:
        servers.append(Server(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_full_download_with_sha256(serve, tmp_path):
    server = serve()
    dest = tmp_path / "models" / "model.bin"
    assert download(server.url, dest, sha256=DATA_SHA256, size=len(DATA)) == DATA_SHA256
    assert dest.read_bytes() == DATA
    assert not dest.with_name("model.bin.part").exists()
    assert server.ranges == [None]


def test_resume_after_dropped_connection(serve, tmp_path):
    half = len(DATA) // 2
    server = serve(drop_first_after=half)
    dest = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    with pytest.raises(DownloadError, match="resume"):
        download(server.url, dest, sha256=DATA_SHA256, timeout=5)
    assert part.stat().st_size == half and not dest.exists()

    assert download(server.url, dest, sha256=DATA_SHA256) == DATA_SHA256
    assert server.ranges == [None, f"bytes={half}-"]
    assert dest.read_bytes() == DATA and not part.exists()


def test_server_without_range_support_restarts_from_zero(serve, tmp_path):
    server = serve(honour_range=False)
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(b"stale bytes that must not survive")
    assert download(server.url, dest, sha256=DATA_SHA256) == DATA_SHA256
    assert server.ranges == ["bytes=33-"]
    assert dest.read_bytes() == DATA


def test_wrong_sha256_deletes_everything(serve, tmp_path):
    server = serve()
    dest = tmp_path / "model.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download(server.url, dest, sha256=wrong)
    assert isinstance(info.value, InputError)
    message = str(info.value)
    assert server.url in message and wrong in message and DATA_SHA256 in message and "deleted" in message
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_deletes_everything(serve, tmp_path):
    server = serve()
    with pytest.raises(ChecksumError, match="size"):
        download(server.url, tmp_path / "model.bin", size=len(DATA) + 1)
    assert list(tmp_path.iterdir()) == []


def test_sha256_prefix(serve, tmp_path):
    server = serve()
    dest = tmp_path / "model.bin"
    assert download(server.url, dest, sha256_prefix=DATA_SHA256[:8].upper()) == DATA_SHA256
    assert dest.read_bytes() == DATA
    wrong_prefix = "ffffffff" if not DATA_SHA256.startswith("ffffffff") else "00000000"
    with pytest.raises(ChecksumError, match=wrong_prefix):
        download(server.url, tmp_path / "other.bin", sha256_prefix=wrong_prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_unreachable_url_names_url_and_import_hint(tmp_path):
    url = "http://127.0.0.1:1/model.bin"  # port 1: nothing listens, the connection is refused
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "model.bin", timeout=5, import_hint=HINT)
    assert url in str(info.value) and HINT in str(info.value) and "browser" in str(info.value)
    assert not (tmp_path / "model.bin").exists()


def test_http_404(serve, tmp_path):
    server = serve()
    url = server.url.replace("model.bin", "missing.bin")
    with pytest.raises(DownloadError, match="404") as info:
        download(url, tmp_path / "model.bin")
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cancel_keeps_part_and_resumes(serve, tmp_path):
    server = serve()
    dest = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    token = CancelToken()

    def cancel_after_first_megabyte(stage, done, total, message):
        if done > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        download(server.url, dest, progress=cancel_after_first_megabyte, cancel=token)
    kept = part.stat().st_size
    assert not dest.exists() and 0 < kept < len(DATA)

    assert download(server.url, dest, sha256=DATA_SHA256) == DATA_SHA256
    assert server.ranges == [None, f"bytes={kept}-"]
    assert dest.read_bytes() == DATA


def test_progress_increases_to_total(serve, tmp_path):
    server = serve()
    calls = []
    download(server.url, tmp_path / "model.bin", progress=lambda *args: calls.append(args))
    stages = {c[0] for c in calls}
    done = [c[1] for c in calls]
    assert stages == {"download model.bin"}
    assert all(c[2] == len(DATA) for c in calls)
    assert done[0] == 0 and done[-1] == len(DATA)
    assert all(a < b for a, b in zip(done, done[1:]))
    assert len(calls) >= 4  # 0, then about every MB of the 3 MB file, then the end


def test_md5_prefix(serve, tmp_path):
    server = serve()
    assert download(server.url, tmp_path / "model.bin", md5_prefix=DATA_MD5[:6]) == DATA_SHA256
    wrong = "000000" if not DATA_MD5.startswith("000000") else "ffffff"
    with pytest.raises(ChecksumError, match=f"md5 {DATA_MD5} does not start with {wrong}"):
        download(server.url, tmp_path / "other.bin", md5_prefix=wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_html_page_instead_of_the_file_is_named(serve, tmp_path):
    """Google Drive answers a large file's link with a virus-scan confirmation page (HTTP 200, text/html)."""
    server = serve(files={"/model.bin": DRIVE_PAGE})
    with pytest.raises(DownloadError) as info:
        download(server.url, tmp_path / "model.bin", size=len(DATA), import_hint=HINT)
    message = str(info.value)
    assert f"the file downloaded from {server.url} is an HTML page, not a checkpoint " \
           "(Google Drive's download-confirmation page?)" in message
    assert "Download anyway" in message and HINT in message
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip") / "tiny_clip", TINY_CLIP_CONFIG)


def served_clip_entry(monkeypatch, server, weights_path: str) -> ModelEntry:
    """A two-file CLIP catalogue entry whose files the test server serves."""
    entry = ModelEntry("served_clip", "clip", "tiny", (
        RemoteFile(f"{server.root}/open_clip_config.json", "open_clip_config.json", None, None, "test"),
        RemoteFile(f"{server.root}{weights_path}", "open_clip_pytorch_model.bin", None, None, "test")), "MIT", "", "",
        open_clip_config={"model_cfg": TINY_CLIP_CONFIG})
    monkeypatch.setattr(cache, "get_entry", lambda name: entry)
    return entry


def test_download_model_validates_all_files_then_installs_and_pins(clisc_home, serve, tiny_clip, monkeypatch):
    weights = (tiny_clip / "open_clip_pytorch_model.bin").read_bytes()
    server = serve(files={"/open_clip_config.json": (tiny_clip / "open_clip_config.json").read_bytes(),
                          "/weights.bin": weights})
    served_clip_entry(monkeypatch, server, "/weights.bin")
    folder = cache.download_model("served_clip")
    assert folder == cache.model_dir("served_clip")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin",
                                                        cache.PINS_FILE]
    pins = json.loads((folder / cache.PINS_FILE).read_text())
    assert pins["open_clip_pytorch_model.bin"] == hashlib.sha256(weights).hexdigest()


def test_failed_multi_file_download_leaves_nothing(clisc_home, serve, tiny_clip, tmp_path, monkeypatch):
    """The config arrives fine, the weights belong to another model: neither is installed, nothing is pinned."""
    other = save_random_clip(tmp_path / "other", {**TINY_CLIP_CONFIG, "embed_dim": 32})
    server = serve(files={"/open_clip_config.json": (tiny_clip / "open_clip_config.json").read_bytes(),
                          "/other.bin": (other / "open_clip_pytorch_model.bin").read_bytes()})
    served_clip_entry(monkeypatch, server, "/other.bin")
    with pytest.raises(InputError) as info:
        cache.download_model("served_clip")
    message = str(info.value)
    assert "open_clip_pytorch_model.bin: does not fit the CLIP model of open_clip_config.json" in message
    assert "was deleted and nothing was installed" in message
    assert not any(p.is_file() for p in cache.model_dir("served_clip").rglob("*"))
