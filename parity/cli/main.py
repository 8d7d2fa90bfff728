"""`parity` command line: dump, inspect, compare, map, overfit, export-layer, check-layer, envelope, drift, scaffold.

Exit codes: 0 parity (or success), 1 divergence found, 2 bad input, 3 internal error (a bug: one line on the
terminal, the traceback in a file under runs/crashes/). No traceback ever reaches the terminal.

Each command lives in its own module with `register(subparsers)`; this one holds only the top parser, the global
options, the mapping of errors to exit codes and the crash file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path

from parity.cli import compare, drift, dump, envelope, inspect, porting, scaffold, train
from parity.cli import map as mapping
from parity.cli.options import GlobalOptions, UsageError, validate_numbers
from parity.errors import ParityError
from parity.runtime import PROJECT_ROOT, prepare

EXIT_INTERNAL_ERROR = 3
CRASH_DIR = PROJECT_ROOT / "runs" / "crashes"

# In `parity --help` order.
COMMANDS = (dump.register, inspect.register, compare.register, mapping.register, train.register, porting.register,
            envelope.register, drift.register, scaffold.register)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error raised as exit-2 bad input (one line) instead of printed and exited on."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class CommandParser(ArgumentParser):
    """A command's parser: it also accepts the global options, after the command's name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        GlobalOptions.add(self, after_command=True)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    GlobalOptions.add(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0 parity/success, 1 divergence, 2 bad input, 3 internal error)."""
    try:
        args = build_parser().parse_args(argv)
        validate_numbers(vars(args))
        prepare(GlobalOptions.threads(args))
        from parity.dump.files import verify_reads

        with verify_reads(GlobalOptions.verify(args)):
            return int(args.func(args) or 0)
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except Exception as error:  # noqa: BLE001 - anything else is a bug in the tool: report it, never show it raw
        return report_internal_error(error, argv)


def report_internal_error(error: BaseException, argv: list[str] | None) -> int:
    """One line on stderr; the traceback in runs/crashes/ (or the temp directory when runs/ is not writable)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = (f"parity {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    path = None
    for folder in (CRASH_DIR, Path(os.environ.get("TMPDIR", "/tmp"))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.txt"
            path.write_text(text)
            break
        except OSError:
            path = None
    where = f"traceback in {path}" if path else "the traceback could not be written"
    summary = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    print(f"internal error (a bug in yolo-parity, not in your input): {summary}; {where}; please report it with "
          f"that file", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
