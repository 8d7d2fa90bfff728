"""Errors that mean "the input is wrong": the CLI prints them without a traceback and exits with code 2."""


class ParityError(Exception):
    """Bad input: a missing tensor, a wrong shape, a corrupt file, an impossible option."""

    exit_code = 2


class DumpError(ParityError):
    """A dump that cannot be read or written as docs/dump-format.md describes."""
