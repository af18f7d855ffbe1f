"""Where a sweep lives: its storage folder and the small JSON state `sweep resume` needs.

The sweep folder (default `<spec folder>/runs/<name>`) holds Ray Tune's experiment state
and `sweep_state.json`; it may be a local path or an object-store URI (written through
pyarrow's filesystem layer). A local index maps sweep names to folders, so
`sweep resume NAME` works from anywhere on the machine that started the sweep.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sweep.errors import StateError
from sweep.util.storage import JsonIndex, is_uri, join, read_bytes, write_bytes_atomic

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
    forward_env: list[str] = field(default_factory=list)  # names only: `sweep resume` forwards them again
    tracking_credentials: list[str] = field(default_factory=list)  # the MLFLOW_TRACKING_* names the URI held
    status: str = "running"  # running | finished | failed | interrupted | stopped by budget
    waiting: str | None = None  # what a trial waits for, while the cluster cannot place it
    budget: dict[str, float] | None = None  # the limits `sweep resume --budget-...` set (else the spec's)
    wall_s: float = 0.0  # the drivers' time so far, for budget.max_wall_hours
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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

# Sweep name -> its folder, for every sweep started on this machine: `sweep resume NAME`
# works from any folder.
INDEX = JsonIndex("sweeps.json")


def remember(name: str, storage: str) -> None:
    try:
        INDEX.put(name, storage)
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
        if indexed := INDEX.get(name_or_path):
            candidates.append(indexed)
    for c in candidates:
        if read_bytes(join(c, STATE_FILE)) is not None:
            return c
    raise StateError(
        f"no sweep found for {name_or_path!r}: give the sweep folder (with {STATE_FILE}), its spec file, "
        "or the name of a sweep started on this machine"
    )


def _from_spec(spec_path: Path) -> list[str]:
    try:
        name = (yaml.safe_load(spec_path.read_text()) or {}).get("name")
    except Exception:
        return []
    if not isinstance(name, str):
        return []
    out = [str((spec_path.resolve().parent / "runs" / name))]
    if indexed := INDEX.get(name):
        out.append(indexed)
    return out
