"""Errors that mean "the input is wrong": the CLI prints them without a traceback and exits with code 2."""


class ParityError(Exception):
    """Bad input: a missing tensor, a wrong shape, a corrupt file, an impossible option."""

    exit_code = 2


class DumpError(ParityError):
    """A dump that cannot be read or written as docs/dump-format.md describes."""


class OutputExists(ParityError):
    """An output that is there already and was not asked to be replaced; the CLI says which flag replaces it."""

    def __init__(self, path, what: str = "output"):
        super().__init__(f"{what} {path} exists; it is replaced only when asked to (force)")
        self.path = path
        self.what = what
