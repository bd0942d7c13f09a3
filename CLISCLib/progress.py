"""Showing a background job's progress in a module's GUI, and cancelling it: the Qt side of `CLISCLib.jobs`.

- `JobWatcher`: a module widget's running job, polled by a Qt timer; its updates and its end go to callbacks,
  and the widget's Start button becomes Cancel meanwhile. For long jobs (segmenting, training).
- `runWithProgressDialog`: wait for a job behind a progress dialog whose Cancel button cancels it. For short
  jobs started from a button (a download, applying a trained model, computing a prediction).
"""
from typing import Callable, Optional

import slicer

from CLISCLib.jobs import BackgroundJob, Progress


def showProgress(progressBar, progress: Progress, detailsLabel=None) -> None:
    """Show ``progress`` on a QProgressBar, with its details in the bar or in ``detailsLabel`` (a QLabel)."""
    progressBar.value = progress.percent
    details = progress.details()
    if detailsLabel is None:
        progressBar.setFormat(f"{progress.heading()} {details} %p%" if details else f"{progress.heading()} %p%")
    else:
        progressBar.setFormat(f"{progress.heading()} %p%")
        detailsLabel.text = details


class JobWatcher:
    """Polls the one running job of a module widget from the main thread, with a Qt timer.

    ``onUpdate(update)`` gets each `Progress` report and log line as they arrive, ``onFinished(job)`` the job
    once it has finished (its `result` or `error` is then set). The widget calls `watch` after starting a job,
    `cancel` for its Cancel button and `stop` in its cleanup.
    """

    def __init__(self, onUpdate: Callable, onFinished: Callable, intervalMs: int = 250) -> None:
        import qt

        self.job: Optional[BackgroundJob] = None
        self._onUpdate, self._onFinished = onUpdate, onFinished
        self._timer = qt.QTimer()
        self._timer.setInterval(intervalMs)
        self._timer.connect("timeout()", self._poll)

    @property
    def running(self) -> bool:
        return self.job is not None

    def watch(self, job: BackgroundJob) -> None:
        self.job = job
        self._timer.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def stop(self) -> None:
        """Cancel the job and stop watching it (the widget is going away)."""
        self.cancel()
        self._timer.stop()
        self.job = None

    def _poll(self) -> None:
        job = self.job
        if job is None:
            return
        for update in job.poll():
            self._onUpdate(update)
        if job.finished:
            self._timer.stop()
            self.job = None
            self._onFinished(job)


def runWithProgressDialog(job: BackgroundJob, title: str, label: str,
                          describe: Optional[Callable[[Progress], str]] = None):
    """Wait for a started ``job`` behind a progress dialog whose Cancel button cancels it; its result, or its
    error raised (`clisc.errors.Cancelled` after Cancel). ``describe(progress)`` is the dialog's text for each
    report (default: the label, the stage, the count and the details)."""
    dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=label, maximum=100)

    def show(stage, done, total, message="", **fields) -> None:
        progress = Progress(stage, done, total, message, fields)
        dialog.labelText = describe(progress) if describe else f"{label}\n{progress.heading()} {progress.details()}"
        dialog.value = progress.percent

    def idle() -> None:
        slicer.app.processEvents()
        if dialog.wasCanceled and not job.cancelled:
            job.cancel()

    try:
        return job.wait(progress=show, idle=idle)
    finally:
        dialog.close()
