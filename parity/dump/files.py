"""Reading and writing dumps: safetensors files plus manifest.json, as docs/dump-format.md describes.

This module knows the layout, never the meaning of a tensor: names are built by `parity.dump.names`.
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import xxhash
from safetensors import safe_open

from parity.dump.header import dtype_name, parse_header
from parity.dump.schema import SCHEMA, SCHEMA_VERSION, check_manifest_schema
from parity.errors import DumpError, ParityError
# The read-verification switch lives in the base room, beside the Report that states it; read here as before.
from parity.findings import read_verification, verify_reads  # noqa: F401

MANIFEST = "manifest.json"
# The per-tensor manifest field every read is checked against when present (docs/dump-format.md).
FAST_CHECKSUM = "xxh3_128"

# The file a tensor goes to when the writer is not told: decided by the first segment of its name.
FILE_OF_GROUP = {
    "model": "weights.safetensors",
    "batch": "batch.safetensors",
    "act": "activations.safetensors",
    "init": "init.safetensors",
    "loss": "loss.safetensors",
    "grad": "grads.safetensors",
    "train": "train.safetensors",
}

def tensor_stats(tensor: torch.Tensor) -> dict:
    """What a statistics-only dump keeps of a tensor (docs/dump-format.md, 'Statistics-only dumps')."""
    data = tensor.detach().cpu()
    values = data.double() if data.dtype != torch.float64 else data
    finite = values[torch.isfinite(values)]
    stats = {
        "nan": int(torch.isnan(values).sum()),
        "inf": int(torch.isinf(values).sum()),
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "mean": float(finite.mean()) if finite.numel() else None,
        "std": float(finite.std(unbiased=False)) if finite.numel() else None,
        "l2": float(finite.norm()) if finite.numel() else None,
    }
    return stats


def fast_checksum(tensor: torch.Tensor) -> str:
    """XXH3-128 of the same raw bytes as `checksum`: what every read is checked against (about 20x faster than
    SHA-256 here). Not cryptographic: it guards against corruption, SHA-256 stays the format's checksum."""
    return xxhash.xxh3_128_hexdigest(_stored_bytes(tensor))


def checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw little-endian bytes, as stored: one pass over the tensor's own memory (a
    memory-mapped tensor is hashed from the mapping, never copied)."""
    return hashlib.sha256(_stored_bytes(tensor)).hexdigest()


def _stored_bytes(tensor: torch.Tensor):
    """The tensor's raw little-endian bytes as a buffer over its own memory (a memory-mapped tensor is read from
    the mapping, never copied)."""
    data = tensor.detach().cpu().contiguous()
    if data.numel() == 0:
        return b""
    return data.reshape(-1).view(torch.uint8).numpy().data


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where /proc says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------- what --force may replace
def _listing(path: Path, limit: int = 4) -> str:
    try:
        entries = sorted(path.iterdir(), key=lambda p: (not p.name.startswith("."), p.name))
    except OSError as error:
        return f"unreadable: {error.strerror}"
    if not entries:
        return "empty"
    shown = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... {len(entries)} entries" if len(entries) > limit else ""
    return "holds " + ", ".join(shown) + more


def check_replaceable_dump(out: Path) -> None:
    """`--force` replaces a dump and nothing else: a directory holding a manifest of this tool's schema and only
    the files such a dump has. Raises DumpError naming what is there otherwise."""
    hint = "remove it yourself or choose another --out"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise DumpError(f"--force replaces only a dump directory: {out} is {kind}; {hint}")
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise DumpError(f"--force replaces only a dump: {out} has no {MANIFEST} ({_listing(out)}); {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else "not a JSON object"
        raise DumpError(f"--force replaces only a dump: {manifest_path} is not a {SCHEMA} manifest "
                        f"(schema: {found!r}); {hint}")
    index = manifest.get("tensors") or {}
    known = {MANIFEST, *FILE_OF_GROUP.values(), "misc.safetensors",
             *(e.get("file") for e in index.values() if isinstance(e, dict) and e.get("file"))}
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if p.name not in known or not p.is_file())
    if foreign:
        shown = ", ".join(foreign[:4]) + (f", ... {len(foreign)} in all" if len(foreign) > 4 else "")
        raise DumpError(f"--force replaces only a dump: {out} also holds {shown}, which no dump writes; {hint}")


def check_replaceable_file(out: Path, what: str, is_ours: Callable[[Path], bool]) -> None:
    """`--force` for a single-file output: only a file this tool wrote (`is_ours`) may be replaced."""
    hint = "remove it yourself or choose another --out"
    if out.is_dir():
        raise DumpError(f"--force replaces only {what}: {out} is a directory ({_listing(out)}); {hint}")
    if out.is_symlink() or not out.is_file():
        raise DumpError(f"--force replaces only {what}: {out} is not a regular file; {hint}")
    try:
        ours = is_ours(out)
    except (OSError, ValueError, ParityError):
        ours = False
    if not ours:
        raise DumpError(f"--force replaces only {what}: {out} is not one; {hint}")


def read_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header ({} when it has none)."""
    read = parse_header(file)
    if read.fault in ("short", "big-endian", "past-end", "not-json"):
        raise DumpError(f"{file} is not a safetensors file")
    return read.metadata if isinstance(read.metadata, dict) else {}


# --------------------------------------------------------------------------------------- writer locking
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling(out: Path, tag: str, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.{tag}" if pid is None else out.parent / f".{out.name}.{tag}-{pid}"


class OutputLock:
    """An exclusive `fcntl` lock on `.OUT.lock` beside OUT, held while a dump is written; the file holds the
    writer's pid. The kernel drops the lock when the process dies, however it dies."""

    def __init__(self, out: Path):
        self.out = out
        self.path = _sibling(out, "lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise DumpError(f"{self.out} is being written by {who}; wait for it to finish or choose another "
                                f"--out") from None
            # the holder before us may have removed the file between our open and our lock: lock the file that
            # is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise DumpError(f"{self.out}: could not take the lock {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _notice_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _write_error(out: Path, error: OSError) -> DumpError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "a file exceeds the file-size limit", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only"}.get(error.errno)
    detail = what or error.strerror or str(error)
    return DumpError(f"cannot write {out}: {detail}; nothing was written, what was there is unchanged")


# ------------------------------------------------------------------------------ streaming file assembly
# safetensors lays a file out by dtype (this order, as safetensors 0.8 sorts them), then by name; `save_file`
# below writes the same bytes as `safetensors.torch.save_file` would (tests/test_dump_writer.py checks it).
_SAFETENSORS_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3",
                      "F8_E5M2", "I8", "U8", "BOOL")
_FILE_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
    torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class SpooledTensor:
    """A tensor's bytes already on disk: `nbytes` at `offset` of the writer's spool file `spool`."""

    dtype: str
    shape: tuple[int, ...]
    spool: Path
    offset: int
    nbytes: int


def save_file(tensors: dict[str, SpooledTensor], path: str | os.PathLike) -> None:
    """Assemble one safetensors file from spooled tensors: the header, then each tensor's bytes copied inside
    the kernel (never through this process's memory), in safetensors' own order."""
    order = sorted(tensors, key=lambda name: (_SAFETENSORS_ORDER.index(tensors[name].dtype), name))
    header, end = {}, 0
    for name in order:
        entry = tensors[name]
        header[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [end, end + entry.nbytes]}
        end += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    sources: dict[Path, int] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            out.flush()
            for name in order:
                entry = tensors[name]
                if entry.spool not in sources:
                    sources[entry.spool] = os.open(entry.spool, os.O_RDONLY)
                _copy_range(sources[entry.spool], out.fileno(), entry.offset, entry.nbytes)
    finally:
        for fd in sources.values():
            os.close(fd)


def _copy_range(source: int, target: int, offset: int, count: int) -> None:
    """`count` bytes from `offset` of `source` appended to `target`, in the kernel where it can."""
    while count > 0:
        try:
            done = os.copy_file_range(source, target, min(count, _COPY_CHUNK), offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = os.write(target, os.pread(source, min(count, _COPY_CHUNK), offset))
        if done == 0:
            raise OSError(errno.EIO, "short copy from the spool file")
        offset += done
        count -= done


class DumpWriter:
    """Streams tensors to disk as they are added and finishes the dump atomically: a temporary sibling
    directory renamed into place.

    Use as a context manager; `add` hashes a tensor and appends its bytes to a spool file of the temporary
    directory at once, so nothing is held in memory; `commit(manifest)` assembles the safetensors files from
    the spools and renames the dump in. Leaving the block without a commit, or by an exception, removes
    everything written so far. While the block runs the writer holds an exclusive lock on OUT (`.OUT.lock`), so
    a second writer of the same OUT is refused; leftovers of a writer that was killed (`.OUT.partial-PID`,
    `.OUT.replaced-PID`) are cleaned up, or put back, on entry and reported to `notice`. Files get the
    permissions the user's umask gives.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False, kind: str = "reference",
                 stats_only: bool = False, notice: Callable[[str], None] = _notice_stderr):
        self.out = Path(out)
        self.force = force
        self.kind = kind
        self.stats_only = stats_only
        self.notice = notice
        self._index: dict[str, dict] = {}
        self._spooled: dict[str, dict[str, SpooledTensor]] = {}
        self._spools: dict[str, Any] = {}
        self._spool_sizes: dict[str, int] = {}
        self._tmp: Path | None = None
        self._lock: OutputLock | None = None
        self.check_target()

    def check_target(self) -> None:
        """Refuse a target that may not be written, before any work is done."""
        if self.out.exists() or self.out.is_symlink():
            if not self.force and not self.out.is_dir():
                raise DumpError(f"--out {self.out} is a file, not a dump directory; choose another --out")
            if not self.force:
                raise DumpError(
                    f"output directory {self.out} already exists; pass --force (make: FORCE=1) to replace it"
                )
            check_replaceable_dump(self.out)
            if not os.access(self.out, os.W_OK | os.X_OK):
                raise DumpError(f"cannot replace {self.out}: it is read-only; nothing was changed")
        parent = self.out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DumpError(f"cannot write {self.out}: {parent} is not writable")

    def __enter__(self) -> "DumpWriter":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = OutputLock(self.out)
            self._lock.acquire()
        except OSError as error:
            self._release()
            raise _write_error(self.out, error) from None
        try:
            self._recover_leftovers()  # may put back an OUT a killed writer had moved aside
            self.check_target()  # again, now that no other writer can change OUT
            self._tmp = _sibling(self.out, "partial", os.getpid())
            self._tmp.mkdir()
        except OSError as error:
            self._release()
            raise _write_error(self.out, error) from None
        except BaseException:
            self._release()
            raise
        return self

    def _recover_leftovers(self) -> None:
        """Holding the lock, every `.OUT.partial-PID` / `.OUT.replaced-PID` is a leftover of a writer that died."""
        for path in sorted(self.out.parent.glob(f".{self.out.name}.replaced-*")):
            pid = path.name.rsplit("-", 1)[-1]
            if not self.out.exists():
                os.replace(path, self.out)
                self.notice(f"restored {self.out} from {path.name}, left by pid {pid} (killed while replacing it)")
            else:
                shutil.rmtree(path)
                self.notice(f"removed {path.name}, the previous dump pid {pid} had already replaced")
        for path in sorted(self.out.parent.glob(f".{self.out.name}.partial-*")):
            pid = path.name.rsplit("-", 1)[-1]
            state = "which is no longer running" if not pid.isdigit() or not _pid_alive(int(pid)) else \
                "which does not hold the lock"
            shutil.rmtree(path)
            self.notice(f"removed stale partial dump {path} left by pid {pid}, {state}")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._close_spools(quiet=True)
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)
        finally:
            self._release()

    def add(self, name: str, tensor: torch.Tensor, file: str | None = None, *, copy: bool = True) -> None:
        """Hash the tensor and write its bytes now: later in-place edits of `tensor` cannot reach the dump, so
        no copy is kept (`copy` is accepted for callers written for the in-memory writer)."""
        del copy
        if self._tmp is None:
            raise DumpError("DumpWriter.add outside its `with` block")
        if name in self._index:
            raise DumpError(f"tensor {name!r} written twice")
        if not isinstance(tensor, torch.Tensor):
            raise DumpError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        file = file or FILE_OF_GROUP.get(name.split(".", 1)[0], "misc.safetensors")
        data = tensor.detach().to("cpu").contiguous()
        entry = {"file": file, "dtype": dtype_name(data.dtype), "shape": list(data.shape), "sha256": checksum(data)}
        if self.stats_only:
            entry["file"] = None
            entry["stats"] = tensor_stats(data)
        else:
            entry[FAST_CHECKSUM] = fast_checksum(data)
            self._spool(name, file, data)
        self._index[name] = entry

    def _spool(self, name: str, file: str, data: torch.Tensor) -> None:
        if data.dtype not in _FILE_DTYPES:
            raise DumpError(f"tensor {name!r}: dtype {data.dtype} cannot be stored in a safetensors file")
        raw = _stored_bytes(data)
        nbytes = raw.nbytes if isinstance(raw, memoryview) else len(raw)
        path = self._tmp / f".{file}.spool"
        try:
            handle = self._spools.get(file)
            if handle is None:
                handle = self._spools[file] = open(path, "wb")
            handle.write(raw)
        except OSError as error:
            raise _write_error(self.out, error) from None
        offset = self._spool_sizes.get(file, 0)
        self._spool_sizes[file] = offset + nbytes
        self._spooled.setdefault(file, {})[name] = SpooledTensor(_FILE_DTYPES[data.dtype], tuple(data.shape), path,
                                                                 offset, nbytes)

    def _close_spools(self, *, quiet: bool = False) -> None:
        """Close (flushing) every spool file; `quiet` when the dump is being thrown away anyway."""
        spools, self._spools = self._spools, {}
        failure = None
        for handle in spools.values():
            try:
                handle.close()
            except OSError as error:
                failure = failure or error
        if failure is not None and not quiet:
            raise failure

    def names(self) -> list[str]:
        return list(self._index)

    def commit(self, manifest: dict) -> Path:
        assert self._tmp is not None, "use DumpWriter as a context manager"
        try:
            self._write_files(manifest)
            self._swap_into_place()
        except OSError as error:
            raise _write_error(self.out, error) from None
        self._tmp = None
        return self.out

    def _write_files(self, manifest: dict) -> None:
        self._close_spools()
        mode = 0o666 & ~current_umask()
        for file, tensors in self._spooled.items():
            save_file(tensors, self._tmp / file)
            os.chmod(self._tmp / file, mode)
            (self._tmp / f".{file}.spool").unlink()
        manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": self.kind,
                    "stats_only": self.stats_only, **manifest}
        manifest["tensors"] = self._index
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")

    def _swap_into_place(self) -> None:
        """The old dump is renamed aside, the new one renamed in, then the old one removed: at every instant
        one complete dump exists on disk (a writer killed in between is repaired by the next one)."""
        if self.out.exists():
            aside = _sibling(self.out, "replaced", os.getpid())
            os.replace(self.out, aside)
            os.replace(self._tmp, self.out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self._tmp, self.out)


class Dump:
    """A dump on disk, read lazily: tensors are memory-mapped one at a time, never all loaded."""

    def __init__(self, path: str | os.PathLike, *, verify: bool | None = None):
        self.path = Path(path)
        # every tensor read is checked against its manifest checksum, once (see `check`)
        self.verify_reads = read_verification() if verify is None else bool(verify)
        self._verified: set[str] = set()
        if not self.path.exists():
            raise DumpError(f"dump {self.path} does not exist")
        if self.path.is_file():
            raise DumpError(f"{self.path} is a file; a dump is a directory holding {MANIFEST} and .safetensors files")
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise DumpError(f"{self.path} is not a dump: it has no {MANIFEST}")
        try:
            text = manifest_path.read_text()
            self.manifest = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DumpError(f"{manifest_path} is not valid JSON: {error}") from None
        if not isinstance(self.manifest, dict):
            raise DumpError(f"{manifest_path}: expected a JSON object, found {type(self.manifest).__name__}")
        schema = self.manifest.get("schema")
        version = self.manifest.get("schema_version")
        if schema != SCHEMA:
            raise DumpError(f"{manifest_path}: schema is {schema!r}, expected {SCHEMA!r}")
        if version != SCHEMA_VERSION:
            raise DumpError(
                f"{manifest_path}: schema_version is {version!r}; this yolo-parity reads version {SCHEMA_VERSION}"
            )
        check_manifest_schema(self.manifest, str(manifest_path), text=text)
        self.index: dict[str, dict] = self.manifest.get("tensors") or self._scan_files()
        self._handles: dict[str, object] = {}

    def _scan_files(self) -> dict[str, dict]:
        """A foreign port may leave the index out: then every safetensors file in the directory is read."""
        index = {}
        for file in sorted(self.path.glob("*.safetensors")):
            for name, entry in read_header(file).items():
                index[name] = {"file": file.name, "dtype": entry["dtype"], "shape": entry["shape"]}
        return index

    # -- the manifest's sections, with defaults for the optional parts of a candidate dump
    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "candidate")

    @property
    def stats_only(self) -> bool:
        return bool(self.manifest.get("stats_only"))

    def stats(self, name: str) -> dict:
        """Summary statistics of a tensor: stored in a statistics-only dump, computed otherwise."""
        entry = self.index.get(name) or {}
        return entry["stats"] if "stats" in entry else tensor_stats(self.get(name))

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def model(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def layers(self) -> list[dict]:
        return self.model.get("layers", [])

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.index if n.startswith(prefix)]

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def _handle(self, file: str):
        if file not in self._handles:
            full = self.path / file
            if not full.exists():
                raise DumpError(f"{self.path}: manifest names {file}, which is missing")
            read_header(full)  # a truncated or corrupt file is named as such, in one line
            try:
                self._handles[file] = safe_open(str(full), framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors raises several types for corrupt files
                raise DumpError(f"{full} is not a readable safetensors file: {error}") from None
        return self._handles[file]

    def get(self, name: str, *, verify: bool | None = None) -> torch.Tensor:
        """The tensor, memory-mapped; checked against its manifest checksum the first time it is read (unless
        the dump was opened with verification off, or `verify=False`)."""
        entry = self.entry(name)
        handle = self._handle(entry["file"])
        try:
            tensor = handle.get_tensor(name)
        except Exception as error:  # noqa: BLE001
            raise DumpError(f"{self.path / entry['file']}: cannot read {name!r}: {error}") from None
        self.check(name, tensor, verify=verify)
        return tensor

    def entry(self, name: str) -> dict:
        """The manifest entry of a tensor whose values the dump holds (DumpError naming what is there otherwise)."""
        entry = self.index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(self.index), n=3, cutoff=0.6)
            hint = f"; nearest: {', '.join(close)}" if close else ""
            raise DumpError(f"{self.path}: no tensor named {name!r}{hint}")
        if entry.get("file") is None:
            raise DumpError(
                f"{self.path} is a statistics-only dump: it holds statistics of {name!r}, not its values"
            )
        return entry

    def check(self, name: str, tensor: torch.Tensor, *, verify: bool | None = None) -> None:
        """Shape against the manifest always; bytes against the manifest's checksum once per tensor when
        verifying (its XXH3-128 where the writer recorded one, else its SHA-256). A mismatch is a DumpError:
        nothing is ever judged against corrupted data."""
        entry = self.index[name]
        if list(tensor.shape) != list(entry["shape"]):
            raise DumpError(
                f"{self.path}: {name!r} has shape {list(tensor.shape)} in {entry['file']} "
                f"but the manifest says {entry['shape']}"
            )
        verify = self.verify_reads if verify is None else verify
        if not verify or name in self._verified or not ({"sha256", FAST_CHECKSUM} & entry.keys()):
            return
        matches = fast_checksum(tensor) == entry[FAST_CHECKSUM] if FAST_CHECKSUM in entry else \
            checksum(tensor) == entry["sha256"]
        if not matches:
            raise DumpError(f"{self.kind} dump corrupted: {name} does not match its checksum "
                            f"({self.path / entry['file']})")
        self._verified.add(name)

    def verified_checksum(self, name: str) -> str | None:
        """The tensor's SHA-256 as its values give it when the dump holds them (checked against the manifest
        unless verification is off, then the manifest's); the manifest's in a statistics-only dump."""
        entry = self.index.get(name) or {}
        if entry.get("file"):
            if "sha256" in entry and not self.verify_reads:
                return entry["sha256"]
            tensor = self.get(name)
            return entry["sha256"] if "sha256" in entry else checksum(tensor)
        return entry.get("sha256")

    def get_optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self.index else None

    def tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names(prefix):
            yield name, self.get(name)

    def verify(self) -> list[str]:
        """Names whose bytes no longer match their checksum (every tensor hashed, none raises)."""
        return [n for n, e in self.index.items()
                if "sha256" in e and e.get("file") and checksum(self.get(n, verify=False)) != e["sha256"]]

    def nbytes(self) -> int:
        files = {e["file"] for e in self.index.values() if e.get("file")}
        return sum((self.path / f).stat().st_size for f in files) + (self.path / MANIFEST).stat().st_size



class DumpWithDerived(Dump):
    """A dump plus tensors computed from its own (held in memory, listed in `index` with `"derived": true`), so a
    reader written for one layout can read a dump stored in another (e.g. an older ultralytics release's head)."""

    def __init__(self, dump: Dump, derived: dict[str, torch.Tensor]):
        # the same files, manifest and open handles as `dump` (Dump.__init__ would parse the manifest again)
        self.__dict__.update(dump.__dict__)
        self.index = {**dump.index, **{name: {"file": None, "derived": True, "dtype": dtype_name(t.dtype),
                                              "shape": list(t.shape)} for name, t in derived.items()}}
        self._derived = dict(derived)

    def get(self, name: str, *, verify: bool | None = None) -> torch.Tensor:
        if name in self._derived:
            return self._derived[name]
        return super().get(name, verify=verify)


def read_header(file: str | os.PathLike) -> dict[str, dict]:
    """The JSON header of a safetensors file, checked: a truncated or corrupt file is named as such."""
    file = Path(file)
    read = parse_header(file)
    size, length = read.size, read.length
    if read.fault == "short":
        raise DumpError(f"{file} is truncated: {size} bytes, a safetensors file starts with an 8-byte length")
    if read.fault == "big-endian":
        raise DumpError(f"{file} is corrupt: its header length is written big-endian")
    if read.fault == "past-end":
        raise DumpError(f"{file} is truncated or corrupt: header says {length} bytes, file has {size - 8}")
    if read.fault == "not-json":
        raise DumpError(f"{file} is corrupt: its header is not JSON")
    if read.fault == "not-object":
        raise DumpError(f"{file} is corrupt: its header is not a JSON object")
    header = read.header
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise DumpError(f"{file} is corrupt: a header entry has no valid data_offsets") from None
    if 8 + length + end > size:
        raise DumpError(f"{file} is truncated: tensors need {8 + length + end} bytes, file has {size}")
    return header
