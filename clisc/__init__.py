"""CLISC engine: text-prompted, annotation-free segmentation of medical images (CLIP saliency + SAM)."""
import logging

from .readers import read_volume
from .volume import Volume

__version__ = "0.1.0"
__all__ = ["Volume", "read_volume", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
