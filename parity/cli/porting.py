"""`parity export-layer`, `export-layers` and `check-layer`: the porting harness, one layer at a time, for ports in
any language (docs/porting-protocol.md).

    parity export-layer --reference DUMP --layer 23 --out layer23.safetensors [--candidate SPEC [--map FILE]]
    parity export-layers --reference DUMP --out layers.safetensors [--layers 0-9,22]
    parity check-layer  --layer-file layer23.safetensors --output port_out.safetensors [--profile P] [--json [PATH]]

The layer file's format is `parity.dump.layer_file`; `parity.replay.export` writes it and
`parity.diagnose.layer_check` judges a port's output against it. `check-layer` exits 0 parity, 1 divergence,
2 bad input.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.dump.layer_file import DEFAULT_PROFILE
from parity.errors import ParityError


# ======================================================================================== export-layer
@dataclass(frozen=True)
class ExportLayerConfig:
    reference: str
    layer: int
    out: str
    candidate: str | None = None
    map_file: str | None = None


class ExportLayerOptions:
    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--reference", required=True, help="reference dump directory")
        parser.add_argument("--layer", type=int, required=True,
                            help="layer index (e.g. 23, the Detect head of yolo11n)")
        parser.add_argument("--out", required=True, help="output .safetensors file")
        parser.add_argument("--candidate", help="also write the parameters under this candidate's names: builtin or "
                                                "package.module:factory (key mapping of parity.replay.mapping)")
        parser.add_argument("--map", dest="map_file", help="YAML/JSON key_map/layer_map for --candidate")

    @staticmethod
    def config(args) -> ExportLayerConfig:
        return ExportLayerConfig(reference=args.reference, layer=args.layer, out=args.out, candidate=args.candidate,
                                 map_file=args.map_file)


def cmd_export_layer(args) -> int:
    from rich.console import Console

    from parity.dump.files import Dump
    from parity.dump.layer_file import LayerFile
    from parity.replay.export import export_layer

    config = ExportLayerOptions.config(args)
    path = export_layer(Dump(config.reference), config.layer, config.out, candidate=config.candidate,
                        map_file=config.map_file, force=True)
    lf = LayerFile(path)
    groups: dict[str, int] = {}
    for name in lf.names:
        group = name.split(".", 1)[0]
        groups[group] = groups.get(group, 0) + 1
    Console().print(f"[green]layer {lf.layer} ({lf.type})[/green] written to {path}: "
                    + ", ".join(f"{n} {g}.*" for g, n in groups.items())
                    + f"; inputs from {', '.join(lf.inputs)}", highlight=False)
    return 0


# ======================================================================================= export-layers
@dataclass(frozen=True)
class ExportLayersConfig:
    reference: str
    out: str
    layers: list[int] | None = None  # None: every layer


def parse_layer_list(text: str) -> list[int]:
    """'0-9,22' -> [0, 1, ..., 9, 22]."""
    indices: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ParityError(f"--layers {text!r}: expected indices and ranges like 0-9,22; found {part!r}") from None
        if lo < 0 or hi < lo:
            raise ParityError(f"--layers {text!r}: expected ascending non-negative ranges; found {part!r}")
        indices.extend(range(lo, hi + 1))
    return indices


class ExportLayersOptions:
    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--reference", required=True, help="reference dump directory")
        parser.add_argument("--out", required=True, help="output .safetensors file")
        parser.add_argument("--layers", help="layers to export, e.g. 0-9,22 (default: all)")

    @staticmethod
    def config(args) -> ExportLayersConfig:
        return ExportLayersConfig(reference=args.reference, out=args.out,
                                  layers=parse_layer_list(args.layers) if args.layers else None)


def cmd_export_layers(args) -> int:
    from parity.dump.files import Dump
    from parity.replay.export import export_layers

    config = ExportLayersOptions.config(args)
    reference = Dump(config.reference)
    out = export_layers(reference, config.out, layers=config.layers)
    count = len(config.layers) if config.layers is not None else len(reference.model.get("layers", []))
    print(f"wrote {out}: {count} layers (layer.<i>.input.k / .param.<name> / .expected.<name>)")
    return 0


# ========================================================================================= check-layer
@dataclass(frozen=True)
class CheckLayerConfig:
    layer_file: str
    output: str
    profile: str | None = None
    json: str | None = None  # "-": the report as JSON on stdout instead of the table
    verbose: bool = False


class CheckLayerOptions:
    @staticmethod
    def add(parser) -> None:
        parser.add_argument("--layer-file", required=True, help="the file written by `parity export-layer`")
        parser.add_argument("--output", required=True,
                            help="the port's output: a .safetensors file (or a candidate dump)")
        parser.add_argument("--profile", default=None, help=f"tolerance profile (default {DEFAULT_PROFILE})")
        parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                            help="write the report as JSON to PATH (bare --json: to stdout, instead of the table)")
        parser.add_argument("--verbose", action="store_true", help="show every row")

    @staticmethod
    def config(args) -> CheckLayerConfig:
        return CheckLayerConfig(layer_file=args.layer_file, output=args.output, profile=args.profile, json=args.json,
                                verbose=args.verbose)


def cmd_check_layer(args) -> int:
    from rich.console import Console

    from parity.diagnose.layer_check import check_layer
    from parity.report import text as render

    config = CheckLayerOptions.config(args)
    report = check_layer(config.layer_file, config.output, profile=config.profile)
    if config.json is not None:
        text = render.to_json(report, None if config.json == "-" else config.json)
        if config.json == "-":
            print(text, end="")
            return report.exit_code
    render.render(report, Console(), verbose=config.verbose)
    return report.exit_code


# ============================================================================================ register
def register(sub) -> None:
    export = sub.add_parser(
        "export-layer", help="write one layer's reference inputs, parameters and expected outputs (for a port)",
        description="Write ONE safetensors file with layer N's reference inputs (input.k), parameters (param.<ultralytics "
                    "name>, and mapped.<candidate name> with --candidate), expected outputs (expected.act.N...) and, "
                    "for the Detect head, the bias init (expected.init...). See docs/porting-protocol.md.")
    ExportLayerOptions.add(export)
    export.set_defaults(func=cmd_export_layer)

    every = sub.add_parser(
        "export-layers", help="write every layer's inputs, parameters and expected outputs into one file",
        description="Write ONE safetensors file holding every layer's layer file (see export-layer): layer i's "
                    "tensors as layer.<i>.input.k, layer.<i>.param.<name>, layer.<i>.expected.<name>, and its metadata "
                    "in the JSON metadata entry `layers`. A port loops over the layers of one file.")
    ExportLayersOptions.add(every)
    every.set_defaults(func=cmd_export_layers)

    check = sub.add_parser(
        "check-layer", help="judge a port's output for one layer against an export-layer file",
        description="Compare the tensors a port wrote (act.N..., init.cls_bias.L) with an export-layer file. "
                    "Exit 0 parity, 1 divergence, 2 bad input.")
    CheckLayerOptions.add(check)
    check.set_defaults(func=cmd_check_layer)


__all__ = ["CheckLayerConfig", "CheckLayerOptions", "ExportLayerConfig", "ExportLayerOptions", "ExportLayersConfig",
           "ExportLayersOptions", "parse_layer_list", "register"]
