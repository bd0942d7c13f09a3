"""Make a plain ``import torchvision`` work, in any script, where torchvision's compiled operators do not load.

`clisc.torchvision_compat` lets CLISC itself import torchvision beside a torch of another build (PyPI's CUDA
torchvision beside a CPU torch). A user's own script that imports torchvision, open_clip or segment_anything
before CLISC does would still fail with ``operator torchvision::nms does not exist``. `install` puts an import
hook first on ``sys.meta_path`` that wraps the loader of the ``torchvision`` package: the real import runs; only
when it fails in exactly that way are the fallback operators defined and the import run again (one warning), as
`clisc.torchvision_compat.import_torchvision` does. With a matched torchvision the hook does nothing else, which
matters: defining the operators before a working compiled library registers its own aborts the process.

`write_pth` writes a ``.pth`` file into site-packages whose one line calls `install` at interpreter start-up;
install.sh does so in the environments where the plain import fails. This module imports only the standard
library, so that the start-up of every Python in that environment stays as quick as before.
"""
from __future__ import annotations

import sys
import sysconfig
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Optional

PTH_NAME = "clisc-torchvision-fallback.pth"
# A .pth line that starts with "import" is run by `site` at start-up; it does nothing once clisc is uninstalled.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('clisc') and "
            "__import__('clisc.torchvision_hook').torchvision_hook.install()\n")


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _TorchvisionFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def write_pth(folder: Optional[str | Path] = None) -> Path:
    """Write the ``.pth`` file that installs the hook at start-up into ``folder`` (default: this interpreter's
    site-packages); returns its path."""
    path = Path(folder or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


class _TorchvisionFinder(MetaPathFinder):
    """Finds ``torchvision`` with the other finders and wraps its loader in a `_FallbackLoader`."""

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[ModuleSpec]:
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FallbackLoader(spec.loader)
                return spec
        return None


class _FallbackLoader(Loader):
    """torchvision's own loader; when running the package fails for want of its compiled operators, runs it again
    after `clisc.torchvision_compat` has defined the fallback ones."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.loader.exec_module(module)
        except RuntimeError as error:
            from clisc import torchvision_compat

            if not torchvision_compat.is_missing_operator_error(error):
                raise
            torchvision_compat.forget_partial_import(keep_package=True)
            torchvision_compat.define_fallback_operators()
            self.loader.exec_module(module)
            torchvision_compat.after_fallback_import(module)

    def __getattr__(self, name):  # get_resource_reader, get_data, is_package... as torchvision's loader has them
        return getattr(self.loader, name)
