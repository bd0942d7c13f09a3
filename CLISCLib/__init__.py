"""CLISCLib: what the two CLISC Slicer modules (CLISCSegment, CLISCTrain) share, installed beside them.

    dependencies   a Slicer new enough; the engine's packages installed on first use (PyTorch extension, pip)
    jobs           background jobs: `ThreadJob` (engine work on a worker thread), `ProcessJob` (an engine process),
                   one interface: start, poll progress, finished, cancel, result or error
    progress       a job's progress in the GUI (`JobWatcher`, `runWithProgressDialog`), and its Cancel
    mrml           the MRML adapter: volume node <-> `clisc.volume.Volume`, masks <-> segments (on a checked grid),
                   exports (DICOM SEG through this Slicer's exporter)
    refinement     the Refine section without Qt: RAS clicks to slice pixels, the markups session, job progress
    terminology    terminology entries for segments, from ``Resources/terminology.json``
    widget         `ModuleWidget`: the module template's widget part both module widgets share (the .ui, the
                   parameter node, the scene, one watched job, the status log)

Importing any of these installs and downloads nothing; the engine's heavy packages are imported inside functions.
"""
