"""Mask R-CNN instance segmentation (torchvision, COCO classes) with a GPU-resident output path."""
