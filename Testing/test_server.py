"""The remote engine: a real `clisc serve` process on 127.0.0.1, and its client (CLISCLib.remote).

The server runs tiny models of the real classes with random weights (a tiny open_clip CLIP loaded from its folder,
tiny SAMs built in the server process: Testing/tiny_server.py), so these tests show the mechanics: the same masks,
refinements and propagations as the engine run here (the one code path), the API key, the limits, bad input, load,
faults, cancel, shutdown, TLS and the version handshake. They cannot show accuracy (random weights), nor speed
(scripts/bench_remote.py measures that).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import oblique_ijk_to_ras
from server_process import ServerProcess
from tiny_server import TINY_SAM

from CLISCLib import remote
from clisc.errors import Cancelled, InputError
from clisc.models.loaders import load_clip
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.progress import CancelToken
from clisc.refine import Refiner
from clisc.sam import SliceSegmenter
from clisc.server import wire
from clisc.volume import Volume
from clisc.zeroshot import ZeroShotSegmenter, preset_options

KEY = "test-key-" + "k3y" * 8  # 33 characters
RUN = dict(preset="fast", saliency="gradcam", slices="all")  # the same cheap run remotely and locally
UPLOAD_LIMIT_MB = 1
STOPPED = (0, -signal.SIGTERM)  # uvicorn ends by the signal it was sent, once shut down


def blob_volume(shape=(5, 96, 96), seed=0, ijk_to_ras=None) -> Volume:
    """A bright ellipsoid in noise, (K, J, I) float32, on an oblique and flipped grid by default."""
    k, j, i = np.indices(shape)
    blob = (2 * (k - shape[0] // 2)) ** 2 + (j - 40) ** 2 + ((i - 50) / 1.5) ** 2 < 300
    array = (blob * 100 + np.random.default_rng(seed).normal(0, 5, shape)).astype(np.float32)
    return Volume(array, oblique_ijk_to_ras(flip=(1, -1, -1)) if ijk_to_ras is None else ijk_to_ras)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("models") / "tiny_clip", TINY_CLIP_CONFIG)


@pytest.fixture(scope="module")
def local_models(clip_folder):
    """The models the server offers, built here the same way (same seed): CLIP, SAM."""
    return load_clip(clip_folder), tiny_sam(**TINY_SAM)


@pytest.fixture(scope="module")
def served(tmp_path_factory, clip_folder):
    """A server with an API key (from a file), a 1 MiB upload limit and its own temporary folder."""
    folder = tmp_path_factory.mktemp("server")
    key_file = folder / "key.txt"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    temp = folder / "temp"
    temp.mkdir()
    server = ServerProcess(["--api-key-file", key_file, "--model", f"tiny-clip={clip_folder}", "--temp-dir", temp,
                            "--max-upload-mb", UPLOAD_LIMIT_MB, "--max-sessions", 12], folder / "server.log")
    assert server.url, server.text()
    server.temp = temp
    yield server
    assert server.stop() in STOPPED, server.text()[-2000:]
    assert list(temp.iterdir()) == []  # its own folder inside is gone too
    assert KEY not in server.text()


@pytest.fixture
def client(served):
    return remote.EngineServer(served.url, KEY)


def spooled(server) -> list:
    """What the server has in its temporary folder (its uploads)."""
    return [p for p in server.temp.rglob("*") if p.is_file()]


def raw(server, method: str, path: str, body: bytes = b"", key: str = KEY, **headers) -> tuple:
    """(status, detail) of a request sent as it is, bypassing the client."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection.request(method, "/v1" + path, body=body, headers=headers)
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    try:
        return answer.status, json.loads(data).get("detail")
    except (ValueError, AttributeError):
        return answer.status, data


def local_segmentation(volume, models, prompts):
    options = preset_options(RUN["preset"], device="cpu", saliency=RUN["saliency"], slices=RUN["slices"])
    return ZeroShotSegmenter(options, clip=models[0], sam=models[1]).segment(volume, prompts)


def test_the_wire_format_is_nrrd_that_itk_reads_on_the_same_grid(tmp_path):
    """The bytes a volume travels as, read by SimpleITK (an independent NRRD reader): same voxels, same IJK→RAS."""
    import SimpleITK as sitk

    volume = blob_volume((3, 7, 5))
    volume.array = (volume.array * 10).astype(np.int16)
    (tmp_path / "volume.nrrd").write_bytes(wire.encode_array(volume.array, volume.ijk_to_ras))
    read = Volume.from_sitk(sitk.ReadImage(str(tmp_path / "volume.nrrd")))
    assert np.array_equal(read.array, volume.array) and np.allclose(read.ijk_to_ras, volume.ijk_to_ras, atol=1e-9)
    array, ijk_to_ras = wire.decode_array(wire.encode_array(volume.array, volume.ijk_to_ras), 10 ** 6)
    assert array.dtype == np.int16 and np.array_equal(array, volume.array) and np.array_equal(ijk_to_ras,
                                                                                             volume.ijk_to_ras)
    lps = tmp_path / "lps.nrrd"  # a file ITK wrote (space left-posterior-superior) reads back on the same grid
    sitk.WriteImage(volume.to_sitk(), str(lps), True)
    array, ijk_to_ras = wire.decode_array(lps.read_bytes(), 10 ** 6)
    assert np.array_equal(array, volume.array) and np.allclose(ijk_to_ras, volume.ijk_to_ras, atol=1e-6)


def test_a_small_upload_cannot_inflate_past_its_header():
    header = ["type: uint8", "dimension: 3", "space: RAS", "sizes: 10 10 10", "space directions: (1,0,0) (0,1,0) "
              "(0,0,1)", "space origin: (0,0,0)", "encoding: gzip"]
    import gzip

    bomb = nrrd_with(header, gzip.compress(bytes(10 ** 7)))  # 10 MB of zeros where the header says 1000 bytes
    with pytest.raises(InputError, match="calls for 1000"):
        wire.decode_array(bomb, 10 ** 9)
    with pytest.raises(InputError, match="more than this server takes"):
        wire.decode_array(nrrd_with(header[:3] + ["sizes: 1000 1000 1000"] + header[4:], b""), 10 ** 8)


def test_remote_equals_local_segment_refine_propagate_on_an_oblique_flipped_grid(client, local_models):
    volume = blob_volume((3, 96, 96))
    session = client.openSession(volume)
    result = session.segment(["tumor", "liver"], clip="tiny-clip", sam="tiny-sam", **RUN)
    local = local_segmentation(volume, local_models, ["tumor", "liver"])
    assert result.names == local.names
    for mask, expected in zip(result.masks, local.masks):
        assert 0 < expected.sum() < expected.size  # empty or full masks would make the comparison weak
        assert mask.shape == volume.array.shape and np.array_equal(mask, expected)

    refiner = Refiner(SliceSegmenter(local_models[1]), volume, axis=0)
    mask = local.masks[0]
    clicks = dict(points=[(50, 40), (20, 20)], labels=[1, 0])
    remote_refinement = session.refine(mask, 1, **clicks, sam="tiny-sam")
    local_refinement = refiner.refine(mask, 1, **clicks)
    assert np.array_equal(remote_refinement.mask, local_refinement.mask)
    assert remote_refinement.iou == pytest.approx(local_refinement.iou, abs=0)
    assert remote_refinement.prompt == local_refinement.prompt
    again = dict(points=[(50, 40), (20, 20), (52, 44)], labels=[1, 0, 1])  # a second click: SAM's own logits
    mask = refiner.apply(mask, local_refinement)
    remote_second, local_second = session.refine(mask, 1, **again, sam="tiny-sam"), refiner.refine(mask, 1, **again)
    assert local_second.prompt["mask_input"] == "previous" == remote_second.prompt["mask_input"]
    assert np.array_equal(remote_second.mask, local_second.mask)

    mask = refiner.apply(mask, local_second)
    remote_propagation = session.propagate(mask, 1, "both", sam="tiny-sam")
    local_propagation = refiner.propagate(mask, 1, "both")
    assert np.array_equal(remote_propagation.mask, local_propagation.mask)
    assert remote_propagation.message == local_propagation.message
    assert remote_propagation.reports["down"]["ious"] == local_propagation.reports["down"].ious
    assert remote_propagation.changed_slices == local_propagation.changed_slices
    session.close()


def test_saliency_maps_travel_when_asked_for(client, local_models):
    volume = blob_volume((2, 96, 96), seed=1)
    result = client.openSession(volume).segment(["tumor"], clip="tiny-clip", sam="tiny-sam", saliencyMaps=True,
                                                     **RUN)
    local = local_segmentation(volume, local_models, ["tumor"])
    assert np.array_equal(result.saliency[0], local.saliency[0]) and result.saliency[0].max() > 0


@pytest.mark.parametrize("key", [None, "wrong-" + KEY[6:]])
def test_no_key_or_a_wrong_key_is_refused_and_runs_nothing(served, key):
    before = remote.EngineServer(served.url, KEY).info()
    status, detail = raw(served, "POST", "/sessions", wire.encode_array(blob_volume().array, np.eye(4)), key=key)
    assert status == 401 and "API key" in detail
    for method, path in (("GET", "/info"), ("GET", "/runs"), ("POST", "/sessions/x/segment")):
        assert raw(served, method, path, key=key)[0] == 401
    with pytest.raises(InputError, match="refused the API key"):
        remote.EngineServer(served.url, key).info()
    after = remote.EngineServer(served.url, KEY).info()
    assert after["sessions"] == before["sessions"] and spooled(served) == []
    assert KEY not in served.text()  # nor anywhere in the server's log so far
    assert KEY not in Path(f"/proc/{served.pid}/cmdline").read_text()  # nor in its command line: read from a file


def nrrd_with(header_lines: list, data: bytes) -> bytes:
    return ("NRRD0004\n" + "".join(f"{line}\n" for line in header_lines) + "\n").encode() + data


GOOD_HEADER = ["type: int16", "dimension: 3", "space: left-posterior-superior", "sizes: 4 3 2",
               "space directions: (1,0,0) (0,1,0) (0,0,1)", "space origin: (0,0,0)", "encoding: raw"]
UPLOADS = {
    "truncated": (lambda: wire.encode_array(blob_volume().array, np.eye(4))[:-3000], 400, "damaged|cut short"),
    "wrong type": (lambda: nrrd_with(GOOD_HEADER[:0] + ["type: complex"] + GOOD_HEADER[1:], bytes(48)), 400, "type"),
    "shape larger than data": (lambda: nrrd_with(GOOD_HEADER, bytes(40)), 400, "calls for 48"),
    "zero size": (lambda: nrrd_with(GOOD_HEADER[:3] + ["sizes: 4 0 2"] + GOOD_HEADER[4:], b""), 400, "empty volume"),
    "2D": (lambda: nrrd_with(["type: int16", "dimension: 2", "sizes: 4 3", "encoding: raw"], bytes(24)), 400, "3D"),
    "no geometry": (lambda: nrrd_with(GOOD_HEADER[:2] + ["sizes: 4 3 2", "encoding: raw"], bytes(48)), 400, "RAS"),
    "separate data file": (lambda: nrrd_with(GOOD_HEADER + ["data file: /etc/passwd"], b""), 400, "data file"),
    "not NRRD": (lambda: b"<html>hello</html>", 400, "not an NRRD"),
    "empty": (lambda: b"", 400, "empty"),
    "over the limit": (lambda: bytes(UPLOAD_LIMIT_MB * 2 ** 20 + 1), 413, "larger than this server takes"),
}


@pytest.mark.parametrize("case", UPLOADS)
def test_bad_uploads_get_a_4xx_with_the_reason_and_leave_nothing(served, client, case):
    make, status, said = UPLOADS[case]
    answer, detail = raw(served, "POST", "/sessions", make(), **{"Content-Type": wire.NRRD_MEDIA_TYPE})
    assert answer == status and detail and __import__("re").search(said, detail), (answer, detail)
    assert client.info(refresh=True)["api_version"] == wire.API_VERSION  # alive: the next request works
    assert spooled(served) == []


def test_the_client_refuses_an_upload_over_the_limit_before_sending(client):
    big = Volume(np.random.default_rng(0).normal(size=(8, 256, 256)).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match="takes at most 1 MiB"):
        client.openSession(big)


@pytest.fixture(scope="module")
def session_id(served):
    return remote.EngineServer(served.url, KEY).openSession(blob_volume((2, 96, 96))).id


REQUESTS = {
    "malformed JSON": ('{"prompts": ["tumor"', 422, "malformed"),
    "a field of the wrong type": ('{"prompts": "tumor", "preset": 3}', 422, "prompts"),
    "an unknown field": ('{"prompts": ["tumor"], "colour": "red"}', 422, "colour"),
    "an unknown option": ('{"prompts": ["tumor"], "options": {"devices": "cuda"}}', 400, "unknown option"),
    "an option of the wrong type": ('{"prompts": ["tumor"], "options": {"relevance_smoothing": "x"}}', 400,
                                    "relevance_smoothing"),
    "an unknown model": ('{"prompts": ["tumor"], "clip": "tiny-clip", "sam": "sam_vit_z"}', 400,
                         "no SAM model 'sam_vit_z'.*tiny-sam"),
    "a path as a model": ('{"prompts": ["tumor"], "clip": "/etc/passwd"}', 400, "no CLIP model"),
    "a 10,000-character prompt": (json.dumps({"prompts": ["tumor " * 1667]}), 400, "10001 characters"),
    "no prompt": ('{"prompts": []}', 400, "at least one"),
    "an unknown preset": ('{"prompts": ["tumor"], "preset": "fastest"}', 400, "preset"),
}


@pytest.mark.parametrize("case", REQUESTS)
def test_bad_requests_get_a_4xx_with_the_reason(served, client, session_id, case):
    body, status, said = REQUESTS[case]
    answer, detail = raw(served, "POST", f"/sessions/{session_id}/segment", body.encode(),
                         **{"Content-Type": "application/json"})
    assert answer == status and __import__("re").search(said, detail), (answer, detail)
    assert "Traceback" not in detail
    assert client.info(refresh=True)["queued"] == 0  # nothing was queued
    assert spooled(served) == []


def test_refine_requests_are_checked(client, served):
    volume = blob_volume((2, 96, 96))
    session = client.openSession(volume)
    other_grid = Volume(np.zeros((2, 96, 96), bool), np.diag([2.0, 1, 1, 1]))
    body = {"mask": wire.to_text(other_grid.array, other_grid.ijk_to_ras), "index": 0, "sam": "tiny-sam"}
    assert raw(served, "POST", f"/sessions/{session.id}/refine", json.dumps(body).encode(),
               **{"Content-Type": "application/json"})[1].startswith(
        "the mask (2 × 96 × 96 voxels) is not on the session's volume grid")
    with pytest.raises(InputError, match="outside the volume"):  # the engine's own check, through the job
        session.refine(np.zeros(volume.array.shape, bool), 7, points=[(5, 5)], sam="tiny-sam")
    with pytest.raises(InputError, match="no session"):
        remote.RemoteSession(client, {"session": "gone", "shape": [2, 96, 96]}, volume).segment(["x"])


def test_load_eight_clients_every_result_right_queue_positions_reported_memory_back(served, local_models):
    """8 clients at once, 2 segmentations each, of 4 volumes on 4 grids (bounded: 16 jobs, and each thread is joined
    with a timeout). Memory: the server's resident size after the load, against before it (after one warm-up
    run), within 64 MiB: 16 volumes, results and sessions come and go; a leak of one session per job would be
    16 × (volume + masks), far less than that, so the check is of the order of gross leaks, stated as such."""
    clients, rounds = 8, 2
    volumes = [blob_volume((2, 64, 64), seed=n, ijk_to_ras=oblique_ijk_to_ras(degrees=10 * n)) for n in range(4)]
    volumes, expected = volumes * 2, [local_segmentation(v, local_models, ["tumor"]).masks[0] for v in volumes] * 2
    assert all(0 < mask.sum() < mask.size for mask in expected)
    warm = remote.EngineServer(served.url, KEY).openSession(volumes[0])
    warm.segment(["tumor"], clip="tiny-clip", sam="tiny-sam", **RUN)
    warm.close()
    before, sessions = served.rss_mib(), remote.EngineServer(served.url, KEY).info()["sessions"]
    outcomes, positions = [[] for _ in range(clients)], [[] for _ in range(clients)]

    def work(n: int) -> None:
        server = remote.EngineServer(served.url, KEY)
        for _ in range(rounds):
            try:
                session = server.openSession(volumes[n])
                result = session.segment(["tumor"], clip="tiny-clip", sam="tiny-sam", progress=lambda stage, *a, **f:
                                         positions[n].append(f["queue_position"]) if stage == "queued" else None, **RUN)
                session.close()
                outcomes[n].append(np.array_equal(result.masks[0], expected[n]))
            except Exception as error:  # recorded, and the test fails on it below
                outcomes[n].append(repr(error))

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes == [[True] * rounds] * clients
    assert max(max(p, default=0) for p in positions) >= 1  # some client waited behind another job and was told so
    info = remote.EngineServer(served.url, KEY).info()
    assert info["sessions"] == sessions and info["queued"] == 0
    after = served.rss_mib()
    print(f"server memory before the load {before:.0f} MiB, after {after:.0f} MiB")
    assert after - before < 64, (before, after)


def job_state(client, job: str, until_not: str = "running") -> dict:
    """The job's status once it is no longer ``until_not`` (each request waits on the server for a change)."""
    status = client.request("GET", f"/jobs/{job}")
    deadline = time.monotonic() + 120
    while status["state"] == until_not and time.monotonic() < deadline:
        status = client.request("GET", f"/jobs/{job}?after={status['version']}&wait=5")
    return status


def test_cancel_ends_the_job_and_returns_nothing(client, served):
    session = client.openSession(blob_volume((8, 96, 96)))
    token, stages = CancelToken(), []

    def progress(stage, done, total, message="", **fields):
        stages.append(stage)
        if stage == "saliency":  # under way, with slices left to do
            token.cancel()

    with pytest.raises(Cancelled):  # every slice gets a map: 8, so that the cancel comes with slices left
        session.segment(["tumor"], clip="tiny-clip", sam="tiny-sam", progress=progress, cancel=token,
                        **{**RUN, "mode": "every-slice"})
    status = job_state(client, session.jobs[-1])
    assert "saliency" in stages and status["state"] == "cancelled"
    assert status["progress"]["done"] < status["progress"]["total"]  # it stopped before its last slice
    assert raw(served, "GET", f"/jobs/{session.jobs[-1]}/result") == (409, "the job was cancelled: it has no result")
    assert raw(served, "GET", f"/jobs/{session.jobs[-1]}/masks")[0] == 409
    session.close()


@pytest.fixture
def own_server(tmp_path, clip_folder):
    """A server of the test's own (no key: localhost only), to kill or stop."""
    temp = tmp_path / "temp"
    temp.mkdir()
    server = ServerProcess(["--model", f"tiny-clip={clip_folder}", "--temp-dir", temp, "--session-timeout", 0.05],
                           tmp_path / "server.log")  # sessions idle for 3 s are dropped
    server.temp = temp
    yield server
    server.kill()


def segment_in_background(server, shape=(8, 96, 96)) -> tuple:
    """Start a segmentation on a thread and wait until it runs; (thread, outcome: its result or error)."""
    session = remote.EngineServer(server.url).openSession(blob_volume(shape))
    running, outcome = threading.Event(), {}

    def run():
        try:
            outcome["result"] = session.segment(["tumor"], clip="tiny-clip", sam="tiny-sam", progress=lambda stage, *a, **f:
                                                running.set() if stage == "saliency" else None, **RUN)
        except Exception as error:  # what the client said
            outcome["error"], outcome["when"] = error, time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert running.wait(300), server.text()[-2000:]
    return thread, outcome


def test_a_server_killed_mid_job_is_reported_by_the_client_without_hanging(own_server):
    thread, outcome = segment_in_background(own_server)
    own_server.kill()
    killed = time.monotonic()
    thread.join(timeout=120)  # a hang would keep it alive: the client must notice by itself
    assert not thread.is_alive()
    assert isinstance(outcome["error"], remote.ServerGone), outcome
    assert "does not answer" in str(outcome["error"]) and own_server.url in str(outcome["error"])
    print(f"the client said the server was gone {outcome['when'] - killed:.2f} s after the kill")


def test_idle_sessions_are_dropped_and_sigterm_cancels_the_running_job_and_removes_the_temp_folder(own_server):
    idle = remote.EngineServer(own_server.url).openSession(blob_volume((1, 8, 8)))
    time.sleep(5)  # more than --session-timeout (3 s), and the janitor's round (0.75 s)
    with pytest.raises(InputError, match="dropped after 3 s idle"):
        idle.segment(["tumor"], clip="tiny-clip", sam="tiny-sam", **RUN)
    thread, outcome = segment_in_background(own_server)
    assert own_server.stop() in STOPPED
    thread.join(timeout=120)
    assert not thread.is_alive() and "result" not in outcome
    assert isinstance(outcome["error"], (Cancelled, remote.ServerGone)), outcome
    assert "cancelling 1 job(s), 1 running" in own_server.text()
    assert list(own_server.temp.iterdir()) == []


def test_a_client_gone_mid_upload_leaves_nothing_on_the_server(served, client):
    address = urlsplit(served.url)
    connection = socket.create_connection((address.hostname, address.port))
    connection.sendall((f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                        f"Content-Type: {wire.NRRD_MEDIA_TYPE}\r\nContent-Length: 900000\r\n\r\n").encode())
    connection.sendall(bytes(300000))
    deadline = time.monotonic() + 30
    while not spooled(served) and time.monotonic() < deadline:  # the server has started spooling the upload
        time.sleep(0.05)
    assert spooled(served)
    connection.close()
    deadline = time.monotonic() + 30
    while spooled(served) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spooled(served) == []
    assert client.info(refresh=True)["api_version"] == wire.API_VERSION  # alive
    assert "an upload was cut short" in served.text()


@pytest.mark.parametrize("client_api, upgrade", [(wire.API_VERSION + 1, "update clisc on the server"),
                                                 (wire.API_VERSION - 1, "update the CLISC extension")])
def test_a_version_mismatch_gets_one_message_naming_both_versions(served, monkeypatch, client_api, upgrade):
    from clisc import __version__

    monkeypatch.setattr(remote, "API_VERSION", client_api)
    with pytest.raises(InputError) as refused:
        remote.EngineServer(served.url, KEY).info()
    message = str(refused.value)
    assert f"this client is clisc {__version__} (API {client_api})" in message
    assert f"the server is clisc {__version__} (API {wire.API_VERSION})" in message and upgrade in message
    status, detail = raw(served, "GET", "/info", **{wire.API_HEADER: str(client_api)})  # the server's own check
    assert status == 409 and f"(API {client_api})" in detail and upgrade in detail


def test_an_answer_that_is_not_a_clisc_servers_says_so(tmp_path):
    """A proxy answering 502 with its own page (SlicerNNInteractive #104: users saw "HTTP 502" and nothing else)."""
    import http.server

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(502)
            self.end_headers()
            self.wfile.write(b"<html>Bad Gateway</html>")

        def log_message(self, *args):
            pass

    proxy = http.server.HTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.handle_request, daemon=True).start()
    with pytest.raises(remote.ServerError, match="HTTP 502 .* did not answer as a CLISC server .*Bad Gateway"):
        remote.EngineServer(f"http://127.0.0.1:{proxy.server_address[1]}").info()
    proxy.server_close()


def test_clisc_serve_without_a_key_stays_on_localhost_and_serves_tls(tmp_path):
    """The real command line: refused on 0.0.0.0 without a key, or with a short key; on 127.0.0.1 it says so, and
    a client trusting the self-signed certificate talks to it over TLS (one that does not is told why)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command (to make a self-signed certificate) is not installed")
    certificate, private_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", private_key, "-out",
                    certificate, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    env = {name: value for name, value in os.environ.items() if name != "CLISC_API_KEY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, "-m", "clisc", "serve", "--port", "0"]
    refused = subprocess.run(command + ["--host", "0.0.0.0"], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert refused.returncode == 2 and "without an API key" in refused.stderr
    short = subprocess.run(command + ["--host", "0.0.0.0"], env=dict(env, CLISC_API_KEY="short"),
                           capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert short.returncode == 2 and "at least 16" in short.stderr

    server = ServerProcess(["--ssl-certfile", certificate, "--ssl-keyfile", private_key], tmp_path / "server.log",
                           cli=True, env=env)
    try:
        assert server.url and server.url.startswith("https://127.0.0.1:"), server.text()
        assert "no API key: listening on 127.0.0.1 only" in server.text()
        info = remote.EngineServer(server.url, caFile=str(certificate)).info()
        assert "litemedsam" in info["models"]["sam"] and info["devices"] == ["cpu"]
        with pytest.raises(InputError, match="not trusted"):
            remote.EngineServer(server.url).info()
        assert server.stop() in STOPPED
    finally:
        server.kill()


def test_a_session_keeps_the_results_of_its_last_jobs_only():
    from clisc.server.jobs import Job
    from clisc.server.sessions import ENDED_JOBS_KEPT, SessionStore

    store = SessionStore(max_sessions=1, idle_seconds=60)
    session = store.open(blob_volume((1, 8, 8)))
    running = Job("segment", session.id, None)
    store.add_job(session, running)
    for _ in range(3 * ENDED_JOBS_KEPT):  # a long session of clicks
        job = Job("refine", session.id, None)
        store.add_job(session, job)
        job.state = "done"
    assert len(session.jobs) == ENDED_JOBS_KEPT + 1 and running.id in session.jobs  # a running job is never dropped
    assert store.job(job.id) is job
    with pytest.raises(KeyError):
        store.job(list(session.jobs)[1] + "x")


def test_devices_are_checked():
    from clisc.server.command import devices

    assert devices("cpu") == ["cpu"]
    with pytest.raises(InputError, match="name each device once"):
        devices("cpu,cpu")
    with pytest.raises(InputError, match="unknown device"):
        devices("gpu0")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            devices("cuda:0,cuda:1")
