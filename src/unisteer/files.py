"""Writing files so that a reader never sees half of one, and nothing the user saved is replaced unasked.

Every write goes to a temporary name beside the target (`.NAME.partial`, or a `.NAME-*` folder) and is
renamed into place when complete: an interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.partial")


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent, default=str))


def read_json(path: str | Path, *, what: str = "file") -> Any:
    """JSON from `path`, or a `UnisteerError` naming the file and what is wrong with it."""
    from .errors import UnisteerError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UnisteerError(f"{path}: no such {what}") from exc
    except UnicodeDecodeError as exc:
        raise UnisteerError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise UnisteerError(f"{path}: invalid JSON ({exc})") from exc


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
