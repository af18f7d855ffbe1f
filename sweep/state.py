"""Where a sweep lives: its storage folder and the small JSON state `sweep resume` needs.

The sweep folder (default `<spec folder>/runs/<name>`) holds Ray Tune's experiment state
and `sweep_state.json`; it may be a local path or an object-store URI (written through
pyarrow's filesystem layer). A local index maps sweep names to folders, so
`sweep resume NAME` works from anywhere on the machine that started the sweep.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "sweep_state.json"
STATE_VERSION = 1


@dataclass
class SweepState:
    name: str
    spec_path: str
    spec_sha256: str
    storage: str  # the sweep folder: Tune's experiment directory, path or URI
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    strategy: str
    address: str | None = None
    status: str = "running"  # running | finished | failed | interrupted
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StateError(Exception):
    pass


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
    target = Path(path.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def save(state: SweepState) -> None:
    state.updated = time.time()
    write_bytes_atomic(join(state.storage, STATE_FILE), (json.dumps(state.to_json(), indent=2) + "\n").encode())
    remember(state.name, state.storage)


def load(storage: str) -> SweepState:
    raw = read_bytes(join(storage, STATE_FILE))
    if raw is None:
        raise StateError(f"{storage}: no {STATE_FILE} (not a sweep folder started by `sweep run`)")
    data = json.loads(raw)
    known = {f for f in SweepState.__dataclass_fields__}
    return SweepState(**{k: v for k, v in data.items() if k in known})


# --- finding a sweep by name -----------------------------------------------------------


def _index_path() -> Path:
    env = os.environ.get("PEFT_SWEEP_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "peft-sweep"
    return root / "sweeps.json"


def _index() -> dict[str, str]:
    path = _index_path()
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def remember(name: str, storage: str) -> None:
    index = _index()
    if index.get(name) == storage:
        return
    index[name] = storage
    try:
        write_bytes_atomic(str(_index_path()), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    except OSError:
        pass  # the index is a convenience; the folder itself is the record


def locate(name_or_path: str) -> str:
    """The sweep folder for a folder, its sweep_state.json, a spec file, or a sweep name."""
    candidates: list[str] = []
    if is_uri(name_or_path):
        candidates.append(name_or_path.rstrip("/").removesuffix("/" + STATE_FILE))
    else:
        p = Path(name_or_path).expanduser()
        if p.name == STATE_FILE:
            candidates.append(str(p.parent.resolve()))
        elif p.is_dir():
            candidates.append(str(p.resolve()))
        elif p.is_file() and p.suffix in (".yaml", ".yml"):
            candidates.extend(_from_spec(p))
        candidates.append(str((Path.cwd() / "runs" / name_or_path).resolve()))
        if name_or_path in _index():
            candidates.append(_index()[name_or_path])
    for c in candidates:
        if read_bytes(join(c, STATE_FILE)) is not None:
            return c
    raise StateError(
        f"no sweep found for {name_or_path!r}: give the sweep folder (with {STATE_FILE}), its spec file, "
        "or the name of a sweep started on this machine"
    )


def _from_spec(spec_path: Path) -> list[str]:
    try:
        import yaml

        name = (yaml.safe_load(spec_path.read_text()) or {}).get("name")
    except Exception:
        return []
    if not isinstance(name, str):
        return []
    out = [str((spec_path.resolve().parent / "runs" / name))]
    if name in _index():
        out.append(_index()[name])
    return out
