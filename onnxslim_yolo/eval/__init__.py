"""Accuracy evaluation internals: output decoding, NMS, ground truth and COCO mAP.

The public entry points are in :mod:`onnxslim_yolo.evaluate`.
"""
from .decode import FORMATS, decode, detect_format, normalize_format
from .metrics import ImageBoxes, coco_map, load_ground_truth
from .nms import nms, non_max_suppression, scale_boxes

__all__ = ["FORMATS", "decode", "detect_format", "normalize_format", "ImageBoxes", "coco_map",
           "load_ground_truth", "nms", "non_max_suppression", "scale_boxes"]
