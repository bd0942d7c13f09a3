"""Where CLISC departs from the two methods' papers and released code on purpose (METHOD.md "Exact rules").

Each run's report lists the deviations that applied to it, so that a result can be compared with a
published one knowing what differs.
"""
from __future__ import annotations

ZERO_SHOT = {
    "no centre crop": "slices go to CLIP whole, padded to a square (the reference centre-crops, which misaligns "
                      "the saliency on non-square images)",
    "box clipped": "boxes are inclusive pixel bounds inside the slice (x1 <= W-1, y1 <= H-1)",
    "coarse-mask resampling": "the saliency goes to 256×256 and its mask back by nearest neighbour between pixel "
                              "centres (the reference's OpenCV INTER_NEAREST shifts the mask by up to one pixel "
                              "towards the origin)",
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
    "classifier normalisation": "classifier input normalised with the ImageNet mean and std (the reference feeds "
                                "raw [0, 1] to ImageNet weights)",
    "CAM inside the body": "CAM voxels outside the body mask are set to 0",
    "label-free CAM threshold": "the CAM is binarised by Otsu or k-means inside the body; the reference tunes its "
                                "threshold on labelled validation data and computes CAMs on ground-truth positive "
                                "slices",
    "box clipped": "the dilated box is clipped to W-1/H-1 (a valid pixel index)",
    "no centre crop": "slices go to the classifier whole, resized",
    "sliding-window U-Net": "the U-Net predicts by sliding window on the whole volume (the reference resizes the "
                            "volume to 128³)",
    "S3F keeps at least one case": "floor(N · keep) of the ranked cases, but at least one",
}
