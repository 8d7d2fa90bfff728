"""Reference capture: run ultralytics once and write everything a comparison needs into a dump."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from parity.capture.reference import CaptureConfig, run_capture
from parity.dump.files import DumpWriter
from parity.runtime import PROJECT_ROOT

DUMPS_DIR = PROJECT_ROOT / "reference_dumps"


def default_dump_dir(config: CaptureConfig) -> Path:
    """Where a reference dump of `config` goes when no directory is named: one name per configuration (the Makefile's
    OUT spells the same), with the steps and optimizer of a training capture."""
    name = (f"{Path(config.model).stem}-nc{config.nc}-{config.imgsz}-b{config.batch}-s{config.seed}-"
            f"{Path(config.images).name}-{config.init}-{config.device.replace(':', '')}")
    if config.steps:
        name += f"-steps{config.steps}-{config.train.optimizer}"
    return DUMPS_DIR / name


def dump_reference(config: CaptureConfig, out: str | Path, *, force: bool = False, stats_only: bool = False,
                   progress: Callable[[str], None] = lambda step: None) -> Path:
    """Capture and write atomically; nothing appears at `out` unless the whole dump succeeded."""
    # Refuses an existing `out` before any work is done, and holds OUT's lock during the capture too, so a second
    # writer of the same OUT is refused at once rather than after minutes of work.
    with DumpWriter(out, force=force, kind="reference", stats_only=stats_only) as writer:
        # Every tensor goes to disk as it is captured: the capture holds no more memory than ultralytics' step.
        capture = run_capture(config, progress, sink=writer.add)
        progress("writing")
        return writer.commit(capture.manifest)


__all__ = ["CaptureConfig", "default_dump_dir", "dump_reference", "run_capture"]
