"""Where CLISC departs from the two methods' papers and released code on purpose (METHOD.md "Exact rules").

Each run's report lists the deviations that applied to it, so that a result can be compared with a
published one knowing what differs.
"""
from __future__ import annotations

ZERO_SHOT = {
    "no centre crop": "slices go to CLIP whole, padded to a square (the reference centre-crops, which misaligns "
                      "the saliency on non-square images)",
    "coarse-mask resampling": "the saliency goes to 256×256 and its mask back by nearest neighbour between pixel "
                              "centres (the reference's OpenCV INTER_NEAREST shifts the mask by up to one pixel "
                              "towards the origin)",
    "saliency back on the slice": "the saliency map comes back from CLIP's input grid to the slice by bilinear "
                                  "interpolation and stays in float (the reference resizes it by nearest neighbour "
                                  "and stores it as a uint8 PNG); on oracle maps (BraTS tumours blurred on CLIP's "
                                  "grid) the coarse masks of the two agree with a 3D Dice of 0.97-0.98, the uint8 "
                                  "step alone costing < 0.002",
    "3D component rule": "the stacked slice masks keep components by the profile's keep_3d rule; neither paper "
                         "has a 3D step",
}
SLICE_GATE = ("slice-relevance gate (--slices auto): our addition, in neither paper; each slice's CLIP relevance "
              "(softmax of the prompt's template ensemble against the negative prompts) is smoothed along the axis "
              "and slices at or above the threshold are segmented")
GSCORECAM = ("gScoreCAM's softmax runs over the kept top-k channels only (the reference gives the unkept ones score "
             "0 inside the softmax, which lets them dominate when logits are small)")
SEEDED = ("seeded mode (--mode seeded): our addition, in neither paper; a saliency map and its SAM box on a few seed "
          "slices only, the other slices by SAM propagation from the seeds (the previous slice's box and logits)")
BOX_ONLY_SAM = ("a box-trained SAM (LiteMedSAM) gets the box alone when a prompt has box and points: points beside "
                "the box lowered its Dice (README, Accuracy and speed)")

COHORT = {
    "CLIP sees the slice": "each slice goes to CLIP min-max scaled to 0-255 (the reference gives CLIP's "
                           "pre-processing the z-scored float slice, which PIL's conversion to RGB truncates and clips "
                           "to 0-255: grey levels of about 0 to 5, a nearly black image)",
    "classifier normalisation": "classifier input normalised with the ImageNet mean and std (the reference feeds "
                                "raw [0, 1] to ImageNet weights)",
    "CAM inside the body": "CAM voxels outside the body mask are set to 0",
    "pseudo-labels and S3F inside the body": "SAM's pseudo-labels, and S3F's re-segmentation before its Dice with "
                                             "the U-Net's prediction, are restricted to the body mask (the reference "
                                             "multiplies both by img != 0 on an image it has z-scored, whose "
                                             "background is not 0, so in effect it restricts nothing)",
    "label-free CAM threshold": "the CAM is binarised by Otsu or k-means inside the body; the reference tunes its "
                                "threshold on labelled validation data and computes CAMs on ground-truth positive "
                                "slices",
    "box clipped": "the dilated box is clipped to W-1/H-1, a valid pixel index (the reference clips to W and H)",
    "no centre crop": "slices go to the classifier whole, resized",
    "sliding-window U-Net": "the U-Net predicts by sliding window on the whole volume (the reference resizes the "
                            "volume to 128³)",
    "S3F keeps at least one case": "floor(N · keep) of the ranked cases, but at least one",
    "box alone for a box-trained SAM": "a box-trained SAM (LiteMedSAM) gets the dilated box alone for pseudo-labels "
                                       "and S3F, without the paper's 5 positive and 4 negative points (they lowered "
                                       "its Dice: README, Accuracy and speed); another SAM gets them all",
}

# Added to a run's list when they apply (clisc.cohort.run).
CLASSIFIER_BACKBONE = {
    "efficientnet-lite0": "slice classifier: EfficientNet-Lite0 (ImageNet weights shipped in a Python package) in "
                          "place of the paper's ResNet-50, LayerCAM on its last stride-16 stage (blocks.4) in place "
                          "of layer3",
}
RANDOM_CLASSIFIER = "slice classifier starts from random weights (the paper's starts from ImageNet weights)"
