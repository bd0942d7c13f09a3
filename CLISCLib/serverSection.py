"""The "Run on" part of a CLISC panel: this computer, or a `clisc serve` server (CLISCLib.remote), on Qt.

The panel's widgets (``ui``): runOnComboBox (this computer / a server; a panel without one always runs on the
server: CLISCTrain's Apply on a server), serverUrlLineEdit, apiKeyLineEdit (a
password field: the key is kept for the Slicer session only, never in the scene; ``CLISC_API_KEY`` in the environment
fills it in), serverCaFileLineEdit (the CA certificate of a server with a self-signed one), checkServerButton and
serverStatusLabel (what the server offers).
"""
import os
from typing import Callable, Optional

import slicer

from CLISCLib.dependencies import ensurePackages

RUN_ON = ["this computer", "a server"]
KEY_VARIABLE = "CLISC_API_KEY"


def describeServer(info: dict) -> str:
    """A server's `CLISCLib.remote.EngineServer.info` in one line for people."""
    return (f"clisc {info['clisc_version']} on {', '.join(info['devices'])}; SAM: "
            f"{', '.join(info['models']['sam']) or 'none'}; CLIP: {', '.join(info['models']['clip']) or 'none'}; "
            f"trained runs: {', '.join(info['runs']) or 'none'}")


class ServerSection:
    """Where a panel's work runs.

    Args:
        ui: the panel's widgets (see the module docstring).
        log: the panel's status log.
        useServer: ``useServer(url, apiKey, caFile)`` of the module's Logic (url None: this computer); it returns
            the `CLISCLib.remote.EngineServer`.
        onChecked: called with the server's info after Check server.
    """

    def __init__(self, ui, log: Callable, useServer: Callable, onChecked: Callable = lambda info: None) -> None:
        self.ui, self.log, self._useServer, self._onChecked = ui, log, useServer, onChecked
        self.server = None  # the EngineServer in use, once `use` chose a server
        ui.apiKeyLineEdit.text = os.environ.get(KEY_VARIABLE, "")
        ui.checkServerButton.connect("clicked(bool)", self.check)

    def remote(self) -> bool:
        return not hasattr(self.ui, "runOnComboBox") or self.ui.runOnComboBox.currentText == RUN_ON[1]

    def updateGui(self) -> None:
        for widget in (self.ui.serverUrlLineEdit, self.ui.apiKeyLineEdit, self.ui.serverCaFileLineEdit,
                       self.ui.checkServerButton):
            widget.enabled = self.remote()

    def use(self) -> bool:
        """Point the Logic at this computer or at the server the panel names, having installed what that needs
        (asked for: on a server, only the remote client's packages); False when it cannot run now."""
        if not self.remote():
            self.server = self._useServer(None)
            return ensurePackages(self.log)
        if not ensurePackages(self.log, remote=True):
            return False
        self.server = self._useServer(self.ui.serverUrlLineEdit.text.strip(), self.ui.apiKeyLineEdit.text.strip()
                                      or None, self.ui.serverCaFileLineEdit.text.strip() or None)
        return True

    def check(self) -> Optional[dict]:
        """Connect to the server and show what it offers; its info, or None when it cannot be reached (said)."""
        with slicer.util.tryWithErrorDisplay("CLISC could not reach the server.", waitCursor=True):
            if self.use() and self.server is not None:
                info = self.server.info(refresh=True)
                self.ui.serverStatusLabel.text = describeServer(info)
                self._onChecked(info)
                return info
        return None
