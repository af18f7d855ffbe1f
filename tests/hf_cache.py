"""A dataset in a Hugging Face datasets cache, laid out as an earlier online
`datasets.load_dataset(repo_id, subset)` leaves it: `<cache>/<owner>___<name>/<subset>/
0.0.0/<revision>/` with `dataset_info.json` and one `<name>-<split>.arrow` per split. It is
built by datasets' own JSON builder from local rows, so nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub gives


def build_cached_dataset(hf_home: Path, repo_id: str, splits: dict[str, list[dict[str, Any]]],
                         subset: str = "default") -> Path:
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    src = hf_home / "sources" / owner / name / subset
    src.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(cache_dir=str(hf_home / "datasets"), dataset_name=f"{owner}___{name}", config_name=subset,
                   data_files={split: str(src / f"{split}.jsonl") for split in splits}, hash=REVISION)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    # A local build names its folder and files after the builder's config id and dataset name;
    # a hub download names them after the subset and the dataset's own name.
    for arrow in built.glob(f"{owner}___{name}-*"):
        arrow.rename(arrow.with_name(arrow.name.replace(f"{owner}___{name}-", f"{name}-", 1)))
    info = json.loads((built / "dataset_info.json").read_text())
    (built / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": name}))
    target = built.parents[1].with_name(subset)
    shutil.move(str(built.parents[1]), str(target))
    return target
