"""CLISC engine: text-prompted, annotation-free segmentation of medical images (CLIP saliency + SAM).

Importing the package loads nothing but the standard library, so that `clisc.environment` can say what is
missing before numpy, torch or SimpleITK are needed; `Volume` and `read_volume` load on first use.
"""
import logging

__version__ = "0.1.0"
__all__ = ["Volume", "read_volume", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    if name == "Volume":
        from .volume import Volume

        return Volume
    if name == "read_volume":
        from .readers import read_volume

        return read_volume
    raise AttributeError(f"module 'clisc' has no attribute '{name}'")
