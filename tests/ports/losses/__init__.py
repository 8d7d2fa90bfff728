"""Detection losses written here in the conventions of real YOLOv8/YOLO11 ports (clean-room, no ultralytics
code): each module's `build` is a loss factory for `parity compare --what loss --loss-candidate`."""
