"""The remote engine's overhead over loopback: one BraTS volume and one click, through `clisc serve` and here.

    python scripts/bench_remote.py [--case ../shared/data/brats2015/pat0001/flair.nii.gz] [--clicks 20]

Starts a server on 127.0.0.1 (Testing/tiny_server.py: LiteMedSAM, which ships with CLISC, and a tiny CLIP with random
weights), then measures, each the median of ``--repeats`` runs:

- the upload: the volume as gzip NRRD (bytes, and seconds to encode and send it until the server holds it);
- a segmentation (fast preset, GradCAM, LiteMedSAM, ``--slices``), remotely (the client's wall clock: upload,
  queue, engine, result) and here (the same engine in this process): the difference is the overhead;
- a click on a slice whose embedding is cached, remotely and here (a `clisc.refine.Refiner` with LiteMedSAM): the
  difference is what the network adds to a click, and the bytes each way.

The machine's load average is printed with the figures: they mean something on a quiet machine only. CLIP has random
weights, so the masks say nothing about accuracy; the engine's time is the real one for LiteMedSAM.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from server_process import ServerProcess  # noqa: E402

from CLISCLib.remote import EngineServer  # noqa: E402
from clisc.models.loaders import load_clip, load_sam  # noqa: E402
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip  # noqa: E402
from clisc.readers import read_volume  # noqa: E402
from clisc.refine import Refiner  # noqa: E402
from clisc.sam import SliceSegmenter  # noqa: E402
from clisc.server.wire import encode_array, to_text  # noqa: E402
from clisc.zeroshot import ZeroShotSegmenter, preset_options  # noqa: E402


def median_seconds(function, repeats: int) -> tuple:
    """(median seconds, the last result) of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=str(ROOT.parent / "shared/data/brats2015/pat0001/flair.nii.gz"))
    parser.add_argument("--slices", default="70:72", help="the slices segmented (default 70:72: three)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")

    volume = read_volume(args.case)
    with tempfile.TemporaryDirectory() as folder:
        clip_folder = save_random_clip(Path(folder) / "tiny_clip", TINY_CLIP_CONFIG)
        server = ServerProcess(["--model", f"tiny-clip={clip_folder}"], Path(folder) / "server.log")
        try:
            run(args, volume, clip_folder, EngineServer(server.url))
        finally:
            server.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


def run(args, volume, clip_folder, server: EngineServer) -> None:
    shape = " × ".join(map(str, volume.array.shape))
    raw_mb = volume.array.nbytes / 1e6
    encode_seconds, data = median_seconds(lambda: encode_array(volume.array, volume.ijk_to_ras), args.repeats)
    upload_seconds, session = median_seconds(lambda: server.openSession(volume), args.repeats)
    print(f"volume {shape} {volume.array.dtype} ({raw_mb:.1f} MB raw): upload {len(data) / 1e6:.2f} MB gzip NRRD; "
          f"encode {encode_seconds:.2f} s, encode + send until the server holds it {upload_seconds:.2f} s")

    run_options = dict(preset="fast", saliency="gradcam", slices=args.slices)
    remote_seconds, result = median_seconds(lambda: session.segment(["brain tumor"], clip="tiny-clip",
                                                                    sam="litemedsam", **run_options), args.repeats)
    options = preset_options("fast", device="cpu", saliency="gradcam", slices=args.slices, clip="tiny-clip",
                             sam="litemedsam")
    clip, sam = load_clip(clip_folder), load_sam("litemedsam")
    local_seconds, local = median_seconds(lambda: ZeroShotSegmenter(options, clip=clip, sam=sam).segment(
        volume, ["brain tumor"]), args.repeats)
    same = np.array_equal(result.masks[0], local.masks[0])
    print(f"segmentation ({args.slices}): here {local_seconds:.2f} s, through the server {remote_seconds:.2f} s "
          f"(the session already uploaded): overhead {remote_seconds - local_seconds:+.2f} s; same mask: {same}")
    with_upload, _ = median_seconds(lambda: server.openSession(volume).segment(
        ["brain tumor"], clip="tiny-clip", sam="litemedsam", **run_options), args.repeats)
    print(f"  with the upload: {with_upload:.2f} s ({with_upload - local_seconds:+.2f} s against here)")

    index = int(args.slices.split(":")[0]) + 1
    mask = local.masks[0].copy()
    mask[index, 100:140, 100:140] |= True  # a segment to click on
    point = [(120.0, 120.0)]
    refiner = Refiner(SliceSegmenter(sam), volume, axis=0)
    refiner.refine(mask, index, point)  # embeds the slice: the clicks below are on a cached slice
    session.refine(mask, index, point, sam="litemedsam")
    local_click, _ = median_seconds(lambda: refiner.refine(mask, index, point), args.clicks)
    remote_click, _ = median_seconds(lambda: session.refine(mask, index, point, sam="litemedsam"), args.clicks)
    request_kb = len(to_text(mask, volume.ijk_to_ras)) / 1e3
    print(f"a click on a cached slice: here {local_click * 1000:.0f} ms, through the server "
          f"{remote_click * 1000:.0f} ms ({(remote_click - local_click) * 1000:+.0f} ms); it sends the segment "
          f"({request_kb:.0f} kB of base64 gzip NRRD) and gets the slice back")


if __name__ == "__main__":
    main()
