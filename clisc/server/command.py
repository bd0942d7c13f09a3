"""``clisc serve``: its options, the API key, TLS, and uvicorn.

The key is read from a file (``--api-key-file``) or the ``CLISC_API_KEY`` environment variable, never from the
command line (where other users of the machine see it in the process list). Without a key the server listens on
127.0.0.1 only, and says so; ``--host`` another address needs a key. TLS: ``--ssl-certfile`` and ``--ssl-keyfile``
(uvicorn's), or a reverse proxy in front (README: Remote engine).
"""
from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import EnvironmentProblem, InputError

logger = logging.getLogger("clisc.server")

KEY_VARIABLE = "CLISC_API_KEY"
MIN_KEY_CHARACTERS = 16
LOCALHOST = ("127.0.0.1", "localhost", "::1")
READY = "clisc serve: listening on"  # the line a caller waits for (tests, scripts): "... http://HOST:PORT"


def add_command(commands) -> None:
    """``clisc serve`` and its options, on the ``clisc`` command's sub-parsers."""
    parser = commands.add_parser("serve", help="run CLISC for remote clients (e.g. Slicer without torch); needs "
                                               "pip install 'clisc[server]'")
    parser.set_defaults(run=serve)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; another needs an API key)")
    parser.add_argument("--port", type=int, default=8451, help="port (default 8451; 0: any free port)")
    parser.add_argument("--api-key-file", metavar="FILE",
                        help=f"file holding the API key clients must send (or set {KEY_VARIABLE}); "
                             f"at least {MIN_KEY_CHARACTERS} characters")
    parser.add_argument("--devices", default="auto", metavar="auto|cpu|cuda:0,cuda:1",
                        help="devices to run on, one job at a time each (default auto: every GPU, else the CPU)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="offer a local SAM checkpoint or open_clip folder under NAME (repeatable); installed "
                             "catalogue models are offered anyway")
    parser.add_argument("--runs", metavar="DIR", help="folder of trained runs (clisc train --out) to offer by name")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload (default 1024 MiB)")
    parser.add_argument("--max-queued", type=int, default=32, help="jobs that may wait (default 32)")
    parser.add_argument("--max-sessions", type=int, default=16, help="volumes kept at once (default 16)")
    parser.add_argument("--session-timeout", type=float, default=30.0, metavar="MINUTES",
                        help="drop a session after this long without a request (default 30)")
    parser.add_argument("--temp-dir", metavar="DIR", help="where uploads are spooled (default: the system's)")
    parser.add_argument("--ssl-certfile", metavar="FILE", help="TLS certificate (PEM), with --ssl-keyfile")
    parser.add_argument("--ssl-keyfile", metavar="FILE", help="TLS private key (PEM)")


def read_api_key(path: Optional[str]) -> Optional[str]:
    """The API key from ``path`` (its first line) or ``$CLISC_API_KEY``; None when neither is given. InputError
    for an empty, short or unreadable key."""
    if path:
        file = Path(path).expanduser()
        try:
            key = file.read_text(encoding="utf-8").splitlines()[0].strip() if file.stat().st_size else ""
        except OSError as error:
            raise InputError(f"--api-key-file {path}: {error.strerror}") from None
        if os.name == "posix" and file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("%s can be read by other users of this machine: chmod 600 it", path)
        where = path
    else:
        key, where = os.environ.get(KEY_VARIABLE, "").strip() or None, KEY_VARIABLE
    if key is not None and len(key) < MIN_KEY_CHARACTERS:
        raise InputError(f"the API key in {where} has {len(key)} characters; use at least {MIN_KEY_CHARACTERS}, "
                         "e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\" > key.txt")
    return key


def devices(spec: str) -> List[str]:
    """The devices of ``--devices``: auto (every CUDA GPU, else the CPU) or a comma-separated list, each checked."""
    from ..result import resolve_device

    if spec == "auto":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{n}" for n in range(count)] if count else ["cpu"]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        resolve_device(name)
    if len(set(names)) != len(names) or not names:
        raise InputError(f"--devices {spec}: name each device once, e.g. cuda:0,cuda:1")
    return names


def extra_models(pairs: List[str]) -> Dict[str, str]:
    models = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name or not path:
            raise InputError(f"--model {pair}: give NAME=PATH")
        models[name] = path
    return models


def require_server_packages() -> None:
    """EnvironmentProblem naming the install command when FastAPI or uvicorn is missing."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(f"clisc serve needs {' and '.join(missing)}: pip install 'clisc[server]'")


def serve(args: argparse.Namespace, models: Optional[dict] = None) -> None:
    """Run the server until Ctrl-C or SIGTERM (then every job is cancelled and the temporary folder removed).
    ``models``: more models by name, e.g. loaded ones (`clisc.server.models.ModelRegistry`'s ``extra``)."""
    require_server_packages()
    from .app import create_app
    from .models import ModelRegistry
    from .service import ServerSettings

    key = read_api_key(args.api_key_file)
    if key is None and args.host not in LOCALHOST:
        raise InputError(f"--host {args.host} without an API key would let anyone who reaches this machine use it: "
                         f"give --api-key-file FILE or set {KEY_VARIABLE}, or listen on 127.0.0.1")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile")
    registry = ModelRegistry({**extra_models(args.model), **(models or {})}, args.runs)
    chosen = devices(args.devices)
    if registry.holds_loaded_models and len(chosen) > 1:
        raise InputError("models loaded by the caller serve one device: give --devices with one device")
    settings = ServerSettings(key, chosen, args.max_upload_mb, max_queued=args.max_queued,
                              max_sessions=args.max_sessions, session_timeout_s=args.session_timeout * 60,
                              temp_dir=args.temp_dir)
    if key is None:
        logger.warning("no API key: listening on %s only, where anyone logged in to this machine can use it", args.host)
    elif not args.ssl_certfile and args.host not in LOCALHOST:
        logger.warning("no TLS: the API key and the images cross the network unencrypted; give --ssl-certfile and "
                       "--ssl-keyfile, or put a TLS reverse proxy in front (README: Remote engine)")
    logger.info("devices %s; SAM models %s; CLIP models %s; runs %s", ", ".join(chosen),
                ", ".join(registry.names("sam")) or "none", ", ".join(registry.names("clip")) or "none",
                ", ".join(run["name"] for run in registry.runs()) or "none")
    _run(create_app(settings, registry), args)


def _run(app, args: argparse.Namespace) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            scheme = "https" if args.ssl_certfile else "http"
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    logger.info("%s %s://%s:%d", READY, scheme, f"[{host}]" if ":" in host else host, port)

    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, log_config=None, timeout_graceful_shutdown=10,
                            server_header=False)
    Server(config).run()
