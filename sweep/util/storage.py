"""Paths that may be local folders or object-store URIs, atomic writes, and small JSON
indexes kept on this machine (sweep name -> folder, sweep name -> submitted job)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trials.artifacts import write_bytes_atomic as write_local_atomic


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(storage: str, *parts: str) -> str:
    if is_uri(storage):
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts))


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of either."""
    if is_uri(path):
        fs, fs_path = _fs(path)
        with fs.open_output_stream(fs_path) as fh:  # an object-store PUT is atomic
            fh.write(data)
        return
    write_local_atomic(Path(path.removeprefix("file://")), data)


def read_bytes(path: str) -> bytes | None:
    if is_uri(path):
        import pyarrow

        fs, fs_path = _fs(path)
        try:
            with fs.open_input_stream(fs_path) as fh:
                return fh.read()
        except (FileNotFoundError, OSError, pyarrow.ArrowException):
            return None
    p = Path(path.removeprefix("file://"))
    return p.read_bytes() if p.is_file() else None


def cache_root() -> Path:
    env = os.environ.get("PEFT_SWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft-sweep"


class JsonIndex:
    """A name -> JSON value map in one file under the cache root; a convenience, never the
    record itself, so an unreadable index reads as empty."""

    def __init__(self, filename: str):
        self.filename = filename

    @property
    def path(self) -> Path:
        return cache_root() / self.filename  # read each time: tests point PEFT_SWEEP_CACHE elsewhere

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, name: str) -> Any:
        return self.read().get(name)

    def put(self, name: str, value: Any) -> None:
        index = self.read()
        if index.get(name) == value:
            return
        index[name] = value
        write_local_atomic(self.path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
