"""Where CLISCSegment's segmentations run: `LocalEngine` (the engine in Slicer's own Python, with torch) or
`RemoteEngine` (a `clisc serve` server, through `CLISCLib.remote`: no torch here). The Logic picks one
(``logic.useServer``); both give a `clisc.result.SegmentResult` on the volume's grid, for `CLISCLib.mrml.addSegments`.
"""
import os

from CLISCLib import mrml


def splitPrompts(text: str) -> list:
    """The prompts in a semicolon-separated text, stripped, empty ones dropped."""
    return [part.strip() for part in text.split(";") if part.strip()]


def describeResult(result, segmentationName: str) -> list:
    """What a finished segmentation says in the log: each segment's size and profile, the time and device."""
    lines = []
    for name, mask in zip(result.names, result.masks):
        relevant = result.report.get("selected_slices", {}).get(name)
        note = " (no slice looked relevant: try Slices: all)" if not mask.any() and not relevant else ""
        profile = result.report.get("profiles", {}).get(name)
        chosen = f", profile {profile['profile']} ({profile['why']})" if profile else ""
        lines.append(f"  {name}: {int(mask.sum())} voxels{chosen}{note}")
    seconds = sum(result.report.get("seconds", {}).values())
    return lines + [f"Done in {seconds:.0f} s on {result.report.get('device')}: {segmentationName}"]


class LocalEngine:
    """The engine here: the zero-shot pipeline or a trained run's U-Net, with the last CLIP and SAM kept loaded."""

    def __init__(self) -> None:
        self._models = {}  # family -> (spec, loaded model): the last CLIP and SAM, kept between runs

    def run(self, volume, prompts, clip=None, sam=None, device="auto", preset="accurate", negativePrompts=None,
            progress=None, cancel=None, trainedRun=None, **options):
        """The engine on a `clisc.volume.Volume`, on any thread (no MRML): a `clisc.result.SegmentResult`. The
        arguments are CLISCSegment's ``segment``'s."""
        from clisc.progress import no_progress
        from clisc.zeroshot import ZeroShotSegmenter, preset_options

        report = progress or no_progress
        if trainedRun:
            from clisc.cohort.apply import apply_run

            return apply_run(trainedRun, volume, device, progress=report, cancel=cancel)

        if isinstance(prompts, str):
            prompts = splitPrompts(prompts)
        named = {family: str(spec) if isinstance(spec, (str, os.PathLike)) else None
                 for family, spec in (("clip", clip), ("sam", sam))}
        settings = preset_options(preset, device=device, **named, **options,
                                  negative_prompts=tuple(negativePrompts) if negativePrompts else None)
        report("loading models", 0, 1, "")
        clipModel = self.loadModel("clip", settings.clip if clip is None else clip)
        samModel = self.loadModel("sam", settings.sam if sam is None else sam)
        report("loading models", 1, 1, "")
        segmenter = ZeroShotSegmenter(settings, clip=clipModel, sam=samModel)
        return segmenter.segment(volume, prompts, progress=report, cancel=cancel)

    def loadModel(self, family: str, spec):
        """A loaded CLIP ("clip") or SAM ("sam") from a catalogue name or path; a loaded model passes through.
        The last one of each family is kept, so that the next run with the same spec does not reload it."""
        if not isinstance(spec, (str, os.PathLike)):
            return spec
        cached = self._models.get(family)
        if cached is None or cached[0] != str(spec):
            from clisc.models.loaders import load_clip, load_sam

            self._models.pop(family, None)  # free the old one before loading the new one
            self._models[family] = (str(spec), (load_clip if family == "clip" else load_sam)(spec))
        return self._models[family][1]

    @staticmethod
    def cudaAvailable() -> bool:
        try:
            import torch
        except ImportError:
            return False
        return torch.cuda.is_available()

    def forget(self, name: str) -> None:
        """Drop the loaded model of that catalogue name, if loaded (its weights were deleted)."""
        self._models = {family: loaded for family, loaded in self._models.items() if loaded[0] != name}


class RemoteEngine:
    """A `clisc serve` server (``server``: a `CLISCLib.remote.EngineServer`) and the sessions of the volumes sent
    to it (``sessions``: each volume uploaded once while unchanged)."""

    def __init__(self, url: str, apiKey=None, caFile=None) -> None:
        from CLISCLib.remote import EngineServer, VolumeSessions

        self.settings = (url, apiKey, caFile)
        self.server = EngineServer(url, apiKey, caFile)
        self.sessions = VolumeSessions(self.server)

    def segmentWork(self, volumeNode, prompts, clip, sam, preset, negativePrompts, trainedRun, saliencyMaps,
                    options: dict):
        """On the main thread: ``work(progress, cancel)`` for a worker thread, segmenting ``volumeNode`` on the
        server (uploaded first unless its session holds it) with the models the server offers, by name; a trained
        run is the server's, by name."""
        from clisc.errors import InputError

        if not all(isinstance(spec, (str, type(None))) for spec in (clip, sam)):
            raise InputError("a server segments with the models it offers: give model names")
        session = self.sessions.prepare(volumeNode.GetID(), mrml.volumeSignature(volumeNode),
                                        lambda: mrml.volumeFromNode(volumeNode))
        prompts = splitPrompts(prompts) if isinstance(prompts, str) else prompts
        options = {key: value for key, value in options.items() if value is not None}
        if negativePrompts:
            options["negative_prompts"] = list(negativePrompts)

        def work(progress, cancel):
            if trainedRun:
                return session(progress, cancel).apply(str(trainedRun), progress=progress, cancel=cancel)
            return session(progress, cancel).segment(prompts, preset, clip, sam, saliencyMaps, progress, cancel,
                                                     **options)
        return work

    def close(self) -> None:
        self.sessions.close()
