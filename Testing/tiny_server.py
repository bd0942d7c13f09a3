"""`clisc serve` with tiny random SAMs of the real classes, for the remote-engine tests and scripts.

    python Testing/tiny_server.py [clisc serve options]

The same server as ``clisc serve`` (`clisc.server.command.serve`), offering besides its options' models a SAM
built in this process: ``tiny-sam`` (`clisc.models.random_weights.tiny_sam`, seed 0, a 256-pixel input: quick). A
tiny SAM has no checkpoint format of its own (the SAM loaders recognise vit_b/l/h and LiteMedSAM), so it is handed
over loaded; a test builds the same one (`TINY_SAM`) to compare with. Tiny CLIPs do load from a folder: give them with ``--model NAME=FOLDER``.
"""
import logging
import sys

from clisc.cli import build_parser
from clisc.errors import InputError
from clisc.models.random_weights import tiny_sam
from clisc.server.command import serve

TINY_SAM = dict(seed=0, image_size=256)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    arguments = build_parser().parse_args(["serve", *sys.argv[1:]])
    try:
        serve(arguments, models={"tiny-sam": tiny_sam(**TINY_SAM)})
    except InputError as error:
        print(f"clisc: error: {error}", file=sys.stderr)
        sys.exit(2)
