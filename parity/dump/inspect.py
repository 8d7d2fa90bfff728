"""`parity inspect DIR`: a dump summarised for a person, at a glance."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from parity.dump import names
from parity.dump.files import Dump


def _shape(shape) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _first_value(dump: Dump, name: str) -> float | None:
    """The first element of a tensor; from its minimum in a statistics-only dump (the biases are constant)."""
    if name not in dump:
        return None
    if dump.stats_only:
        return dump.stats(name)["min"]
    return float(dump.get(name).reshape(-1)[0])


def render_inspect(dump: Dump, console: Console | None = None) -> None:
    console = console or Console()
    manifest, config, model = dump.manifest, dump.config, dump.model
    versions = manifest.get("versions", {})
    env = manifest.get("environment", {})
    console.print(f"[bold]{dump.path}[/bold]  ({dump.kind} dump, schema {manifest.get('schema_version')}, "
                  f"{len(dump.index)} tensors, {dump.nbytes() / 1e6:.1f} MB)")
    if config:
        console.print("config: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "cases"))
    if versions:
        console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if env:
        console.print(f"environment: {env.get('device')} ({env.get('device_name')}), threads {env.get('threads')}, "
                      f"TF32 {env.get('tf32_matmul')}/{env.get('tf32_cudnn')}, "
                      f"deterministic {env.get('deterministic_algorithms')}")
    init = manifest.get("init", {})
    if init:
        console.print(f"init: {init.get('mode')}")

    layers = dump.layers
    if layers:
        table = Table(title=f"{model.get('yaml')}: {len(layers)} layers, {model.get('parameters', 0):,} parameters, "
                            f"strides {model.get('strides')}, nc {model.get('nc')}, reg_max {model.get('reg_max')}")
        for column in ("#", "type", "from", "params", "output"):
            table.add_column(column, justify="right" if column in ("#", "params") else "left")
        for layer in layers:
            outputs = "; ".join(f"{n.split('.', 2)[-1] if n.count('.') > 1 else ''}{' ' if n.count('.') > 1 else ''}"
                                f"{_shape(s)}" for n, s in layer.get("outputs", {}).items())
            table.add_row(str(layer["index"]), layer["type"], ",".join(map(str, layer["from"])),
                          f"{layer['parameters']:,}", outputs)
        console.print(table)

    _render_bias_init(dump, console, model)
    _render_loss(dump, console)
    grads = dump.names("grad.param.")
    if grads:
        console.print(f"gradients: {len(grads)} parameter gradients, "
                      f"{len(dump.names('grad.head.'))} head-output gradients")


def _render_bias_init(dump: Dump, console: Console, model: dict) -> None:
    strides = model.get("strides") or []
    if not dump.names("init.cls_bias."):
        return
    table = Table(title="Detect class-bias init: log(5 / nc / (640 / stride)²)")
    for column in ("level", "stride", "stored", "pure float32", "pure float64"):
        table.add_column(column, justify="right")
    for level, stride in enumerate(strides):
        values = [_first_value(dump, names.init_bias("cls_bias", level, v)) for v in ("stored", "float32", "float64")]
        if values[0] is None:
            continue
        table.add_row(str(level), f"{stride:g}", *(f"{v:.9g}" if v is not None else "-" for v in values))
    console.print(table)


def _render_loss(dump: Dump, console: Console) -> None:
    cases = dump.manifest.get("loss", {}).get("cases", [])
    if not cases:
        return
    loss_names = dump.manifest.get("loss", {}).get("loss_names") or ["box", "cls", "dfl"]
    table = Table(title=f"loss ({dump.manifest['loss'].get('criterion')}, model.loss(batch)[1])")
    table.add_column("case")
    table.add_column("boxes", justify="right")
    for name in loss_names:
        table.add_column(name, justify="right")
    table.add_column("foreground anchors", justify="right")
    branch = (dump.manifest["loss"].get("branches") or [None])[0]
    if dump.stats_only:
        console.print("loss: statistics-only dump, loss values not stored")
        return
    for case in cases:
        items = dump.get_optional(names.loss_output(case["name"], "items"))
        fg = dump.get_optional(names.loss(case["name"], "assign", "fg_mask", branch))
        cells = [f"{float(v):.6g}" for v in items] if items is not None else ["-"] * len(loss_names)
        table.add_row(case["name"], str(case.get("boxes", "?")), *cells, str(int(fg.sum())) if fg is not None else "-")
    console.print(table)
