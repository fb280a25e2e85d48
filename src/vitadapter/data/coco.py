"""COCO detection and instance segmentation: the 80 classes detectors are trained on, as mmdet's
``CocoDataset`` orders them (0-based contiguous labels), and COCO's own category ids of each."""
from .coco_stuff import CLASSES as _COCO_STUFF

# COCO-Stuff lists COCO's 80 thing classes first, in COCO's category order
CLASSES = _COCO_STUFF[:80]

# label i is COCO category CATEGORY_IDS[i] (the annotation files skip 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
