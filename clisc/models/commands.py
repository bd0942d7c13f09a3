"""The ``clisc models`` command: list the catalogue, download, import, forget or locate model weights."""
from __future__ import annotations

import argparse


def add_models_command(commands) -> None:
    """Add ``models`` and its actions to the ``clisc`` sub-commands ``commands`` (argparse's subparsers)."""
    models = commands.add_parser("models", help="list, download, import, forget or locate model weights")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    model_commands.add_parser("list", help="the catalogue and what is installed").set_defaults(run=_list)
    download = model_commands.add_parser(
        "download", help="download a model (resumes; checks size, hashes and architecture before installing)")
    download.add_argument("name")
    download.set_defaults(run=_download)
    imported = model_commands.add_parser("import", help="install a model from a local file or folder")
    imported.add_argument("name")
    imported.add_argument("file", help="the checkpoint file, or a folder holding the model's files")
    imported.set_defaults(run=_import)
    forget = model_commands.add_parser("forget", help="remove an installed model and its pinned hashes")
    forget.add_argument("name")
    forget.set_defaults(run=_forget)
    path = model_commands.add_parser("path", help="where models are cached, or where one model is")
    path.add_argument("name", nargs="?")
    path.set_defaults(run=_path)


def _list(args: argparse.Namespace) -> None:
    """One row per catalogue model. Installed: yes, no (downloaded on first use), or "ships with CLISC" for a
    model in an installed Python package (copied into the cache on first use, without a download)."""
    from .cache import is_installed, model_dir, packaged_file
    from .catalogue import CATALOGUE

    print(f"{'name':<18} {'family':<10} {'architecture':<20} {'size':>19}  {'sha256':<9} {'installed':<16} licence")
    for entry in CATALOGUE:
        size_text = _size_text(entry)
        published = sum(f.sha256 is not None for f in entry.files)
        pinned = (model_dir(entry.name) / "pinned_sha256.json").is_file()
        hashes = ("published" if published == len(entry.files) else "pinned" if pinned
                  else "partial" if published else "unknown")
        installed = "yes" if is_installed(entry) else "ships with CLISC" if packaged_file(entry) else "no"
        print(f"{entry.name:<18} {entry.family:<10} {entry.architecture:<20} {size_text:>19}  {hashes:<9} "
              f"{installed:<16} {entry.licence}")


def _size_text(entry) -> str:
    """The installed size when the model is installed, else the published size when every file has one, else ?."""
    from .cache import installed_size, is_installed

    if is_installed(entry):
        size, source = installed_size(entry.name), "installed"
    elif all(f.size is not None for f in entry.files):
        size, source = sum(f.size for f in entry.files), "published"
    else:
        return "?"
    return f"{size / 1e9:.2f} GB {source}" if size >= 1e9 else f"{size / 1e6:.0f} MB {source}"


def _download(args: argparse.Namespace) -> None:
    from ..progress import TqdmProgress
    from .cache import download_model

    progress = TqdmProgress()
    try:
        path = download_model(args.name, progress=progress)
    finally:
        progress.close()
    print(path)


def _import(args: argparse.Namespace) -> None:
    from .cache import import_model

    print(import_model(args.name, args.file))


def _forget(args: argparse.Namespace) -> None:
    from .cache import remove_model

    removed = remove_model(args.name)
    print("\n".join(f"removed {path}" for path in removed) or f"model '{args.name}' is not installed; nothing removed")


def _path(args: argparse.Namespace) -> None:
    from .cache import clisc_home, model_path

    print(model_path(args.name) if args.name else clisc_home() / "models")
