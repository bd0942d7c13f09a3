"""``python -m clisc`` with the tests' models: the engine process the CLISCTrain tests start.

The real command line (`clisc.cli.main`) in a process of its own, with two substitutions that random weights
make necessary (as in test_cohort_run.py): SAM checkpoints load as a small SAM of the real classes at 256-pixel
input (a full vit_b is minutes per case on a CPU), and the slice classifier calls every slice abnormal (a random
ResNet calls none, which would leave CAMs, SAM and the U-Net nothing to learn). Everything else runs for real.

    python Testing/tiny_engine.py train COHORT --prompt TEXT --out RUN_DIR ...
"""
import sys

import numpy as np

from clisc.cli import main
from clisc.cohort import classifier
from clisc.models import loaders
from clisc.models.random_weights import tiny_sam


def every_slice_abnormal(model, images_uint8, **kwargs) -> np.ndarray:
    return np.ones(len(images_uint8), np.float32)


if __name__ == "__main__":
    classifier.classify = every_slice_abnormal
    loaders.load_sam = lambda spec, device="cpu": tiny_sam(image_size=256)
    sys.exit(main())
