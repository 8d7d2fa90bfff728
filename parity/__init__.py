"""yolo-parity: find where a re-implementation of ultralytics YOLO training departs from ultralytics."""

__version__ = "0.1.0"
