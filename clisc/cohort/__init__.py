"""CLISC cohort pipeline (METHOD.md §B): pseudo-labels from CLIP, CAM and SAM, then a self-trained 3D U-Net."""
