"""Writing files so that a reader never sees half of one, and reading them back with errors that name them.

Every write goes to a temporary name beside the target (`.NAME.partial`, or a `.NAME-*` folder) and is
renamed into place when complete: an interrupted run leaves either the old file or the new one. JSON is
always valid JSON: non-finite floats are written as null (never as the non-standard NaN).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UnisteerError


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.partial")


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`data` at `path`, never half of it; a failed write (a full disk) leaves no `.partial` file behind."""
    path = Path(path)
    with writing_file(path) as fh:
        fh.write(data)
    return path


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(_finite(data), indent=indent, default=str, allow_nan=False))


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


@contextmanager
def writing_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """An open file handle whose contents appear at `path` only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


@contextmanager
def writing_folder(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed onto it if the block completes (replacing an existing
    folder only when `replace`); removed if it does not."""
    tmp = temporary_folder_beside(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = partial_path(path)
    if path.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UnisteerError(f"{path} already exists; pass overwrite=True to replace it")
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | Path, *, what: str = "file") -> Any:
    """JSON from `path`, or a `UnisteerError` naming the file, the line and what is wrong with it."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UnisteerError(f"{path}: no such {what}") from exc
    except UnicodeDecodeError as exc:
        raise UnisteerError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise UnisteerError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    except RecursionError:
        raise UnisteerError(f"{path}: the JSON nests too deeply to read") from None


def check_regular_file(path: Path, what: str = "file") -> None:
    """Refuse what is there but is not a plain file: a folder would fail with an OSError, and reading a FIFO
    (named pipe) would wait forever for a writer."""
    if path.exists() and not path.is_file():
        raise UnisteerError(f"{path}: expected a regular file ({what}), found a {_kind(path)}")


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if path.is_fifo():
        return "named pipe (FIFO)"
    return "special file"


def read_yaml(path: str | Path, *, what: str = "file") -> Any:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UnisteerError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UnisteerError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise UnisteerError(f"{path}: invalid YAML ({exc})") from exc


def temporary_folder_beside(path: Path) -> Path:
    """An empty folder next to `path` (same file system, so it can be renamed onto it), with the permissions
    a plain `mkdir` would give under the current umask (mkdtemp alone makes it 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


LOCK_FILE = ".lock"


class RunLock:
    """An exclusive hold on a run folder for as long as the block runs: a second process (or a second lock in
    this one) is refused at once with the holder's PID, instead of both writing the same files.

    `fcntl.flock` on `FOLDER/.lock`: the kernel drops the lock when the holder exits, however it exits, so a
    killed run never leaves the folder locked. The file is left in place (deleting it would let two processes
    lock two different files of one name).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UnisteerError(f"{path}: cannot lock the run folder ({exc.strerror})") from exc
            raise UnisteerError(f"{self.folder} is in use by another unisteer process (PID {holder}); wait for it "
                                "to finish or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the lock
            self._fd = None


class JsonlLog:
    """An append-only JSON-lines log (generations, sweep rows, judge replies, training metrics): one record a
    line, appended in place — rewriting a growing file on every batch would cost more than the work it logs.

    A run killed mid-write leaves a torn last line. `lines()` leaves it out, `repair()` cuts it from the file
    (a complete record that only lacks its newline is kept and given one), and `append` always starts on a
    fresh line, so a torn tail can never swallow a new record. `fsync`: force each append to disk — for rows
    that took minutes to compute; off where a lost tail is cheap to redo.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.torn_tail = False  # whether the last `lines()` left a torn last line out

    def lines(self) -> list[tuple[int, str]]:
        """(line number, text) of every complete, non-empty line; a torn last line is left out."""
        self.torn_tail = False
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]
        if tail and _is_record(tail):
            complete.append(tail)
        self.torn_tail = bool(tail) and len(complete) < len(lines)
        return [(number, line) for number, line in enumerate(complete, start=1) if line.strip()]

    def repair(self) -> int:
        """Cut a torn last line from the file; returns the number of bytes dropped."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1
        if _is_record(data[start:]):
            return 0  # complete; the next `append` starts a new line after it
        with self.path.open("r+b") as fh:
            fh.truncate(start)
        return len(data) - start

    def append(self, records: Sequence[Any]) -> None:
        """Append records (JSON values; a non-finite float is written as null, never as NaN)."""
        if not records:
            return
        text = "".join(json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n"
                       for record in records)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as fh:
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        text = "\n" + text
                fh.write(text.encode("utf-8"))
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            raise UnisteerError(f"cannot write {self.path}: {exc.strerror or exc}; the lines written so far are "
                                "kept — free space (or fix the folder) and rerun the same command to resume") from exc


def _is_record(text: str | bytes) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return _finite(value.item())  # numpy / torch scalars
    return value
