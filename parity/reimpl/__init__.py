"""The built-in clean-room re-implementation of ultralytics YOLOv8 / YOLO11 detection, and its injected bugs."""

from .blocks import dfl
from .inject import INJECTIONS
from .model import Detector, ModelTweaks, build_detector, find_model_yaml, parse_model_yaml

__all__ = ["Detector", "INJECTIONS", "ModelTweaks", "build_detector", "dfl", "find_model_yaml", "parse_model_yaml"]
