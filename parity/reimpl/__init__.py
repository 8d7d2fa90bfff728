"""The built-in clean-room re-implementation of ultralytics YOLOv8 / YOLO11 detection (model and loss).

Clean reference code only: known causes of divergence are planted from outside by `parity.causes`."""

from .blocks import dfl
from .model import Detector, build_detector, find_model_yaml, parse_model_yaml

__all__ = ["Detector", "build_detector", "dfl", "find_model_yaml", "parse_model_yaml"]
