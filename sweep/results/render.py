"""A comparison Table as text: markdown shaped like the seed page's table, CSV with raw
numbers, HTML, JSON; and the same files attached to the sweep's parent run."""

from __future__ import annotations

import csv
import html
import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweep.results.table import ARROWS, Column, Row, Table, plain
from sweep.tracking.runs import attach_to_parent
from trials.adapters import FAMILIES

if TYPE_CHECKING:
    from mlflow import MlflowClient


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_value(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if key in ("eval_loss", "eval_loss_before", "train_loss", "test_loss", "forgetting", "forgetting_before",
               "forgetting_after"):
        return f"{v:.4f}"
    if key.endswith(("_accuracy", "_exact_match")):
        return f"{v:.3f}"
    if key == "eval_perplexity":
        return f"{v:.3f}"
    if key == "s_per_step":
        return f"{v:.3g}"
    if key in ("tokens_per_s", "trainable_params", "total_params"):
        return f"{v:,.0f}"
    if key == "peak_memory_mb":
        return f"{v:,.0f} MiB"
    if key == "adapter_bytes":
        return human_bytes(v)
    if key == "device_hours":
        return f"{v:.3g}"
    if key == "trainable_percent":
        return f"{v:.3g}%"
    return f"{v:.4g}"


def _cell_text(table: Table, row: Row, key: str) -> str:
    cell = row.cells[key]
    if key == "trainable_percent":
        count = format_value("trainable_params", row.trainable_params)
        text = f"{count} ({format_value(key, cell.value)})" if row.trainable_params is not None else format_value(key, cell.value)
    else:
        text = format_value(key, cell.value)
    if key == table.metric and cell.value is not None:
        st = row.stats
        if st is not None and st.ci_low is not None and st.ci_high > st.ci_low:
            text = f"{text} [{format_value(key, st.ci_low)}, {format_value(key, st.ci_high)}]"
        elif cell.std is not None:
            text = f"{text} ± {format_value(key, cell.std).removesuffix('%')}"
        text += f" (n={cell.n})"
    return text


def _versus_best(table: Table, row: Row) -> str:
    """The row against the best row: the paired test's verdict and its Holm-adjusted p."""
    st = row.stats
    if st is None or st.mean is None:
        return "—"
    if row.label == table.significance.get("best_row"):
        return "best"
    if st.p_vs_best is None:
        return "not tested"  # no per-example predictions shared with the best row
    seeds = f"; seeds p={st.p_seeds:.2g}" if st.p_seeds is not None else ""
    return f"{'≈ best' if st.tied_with_best else 'worse'} (p={st.p_vs_best:.2g}{seeds})"


def _trials_text(row: Row) -> str:
    text = f"{row.finished} ok"
    if row.failed:
        text += f" / {row.failed} failed"
    if row.other:
        text += f" / {row.other} unfinished"
    return text


def _describe_adapter(row: Row) -> str | None:
    family = FAMILIES.get(row.adapter_type)
    if family is None or not row.adapter:
        return None
    try:
        fields = family.fields.model_validate({k: v for k, v in row.adapter.items() if v is not None})
    except Exception:  # params from another version of the catalogue: fall back to the raw values
        return None
    return family.describe(fields)


def _hparams_text(row: Row) -> str:
    described = _describe_adapter(row)
    parts = [described] if described else []
    for k, v in row.best_config.items():
        if described is not None and k.startswith("adapter."):
            continue
        parts.append(f"{k.split('.', 1)[-1]}={plain(v)}")
    return " ".join(parts) or "—"


def _header(col: Column, table: Table) -> str:
    arrow = ARROWS.get(col.goal, "")
    title = f"{col.title} {arrow}".strip()
    if col.key == table.metric:
        title = f"{col.key} {arrow} (best config: mean [95% CI])".replace("  ", " ")
    return title


def _grid(table: Table, emphasis) -> tuple[list[str], list[list[str]]]:
    headers = ["Adapter", *[f"{f}" for f in table.by], "Extra params (approx.)"]
    headers += [_header(table.columns[0], table), "vs best"] + [_header(c, table) for c in table.columns[1:]]
    headers += ["Trials", "Best hyperparameters", "Key strength", "Best for"]
    body = []
    for r in table.rows:
        line = [r.variant, *[plain(r.by[f]) for f in table.by], r.approx_extra_params]
        for i, c in enumerate(table.columns):
            text = _cell_text(table, r, c.key)
            line.append(emphasis(text) if r.cells[c.key].best else text)
            if i == 0:
                line.append(_versus_best(table, r))
        line += [_trials_text(r), _hparams_text(r), r.key_strength, r.best_for]
        body.append(line)
    return headers, body


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    headers, body = _grid(table, lambda s: f"**{s}**")
    for line in body:
        line[0] = f"`{line[0]}`"
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md_escape(c) if i else c for i, c in enumerate(line)) + " |" for line in body]
    c = table.counts
    directions = "; ".join(
        f"{col.key} {'lower' if col.goal == 'minimize' else 'higher'} is better" for col in table.columns if col.goal != "none"
    )
    notes = [
        "",
        f"Sweep `{table.sweep}`: {c['trials']} trials, {c['finished']} finished, {c['failed']} failed"
        + (f", {c['other']} unfinished" if c["other"] else "")
        + f". Ranked by `{table.metric}` ({table.goal}).",
        "Each row reports its best configuration (best mean over seeds); failed and unfinished trials are counted, never averaged. "
        "Bold: best in its column. " + directions + ".",
        "Extra params (approx.) is the catalogue's typical range; Trainable (measured) is what this sweep's model trained.",
        *_significance_notes(table),
    ]
    return "\n".join(out + notes) + "\n"


def _significance_notes(table: Table) -> list[str]:
    sig = table.significance
    if not sig or sig.get("best_row") is None:
        return []
    notes = [f"Interval: {sig['interval']}."]
    if sig.get("test") and sig["tested_rows"]:
        tied = sig["tied_rows"]
        notes.append(
            f"{len(tied)} of {sig['tested_rows']} rows are statistically indistinguishable from the best "
            f"(`{sig['best_row']}`)" + (f": {', '.join(f'`{t}`' for t in tied)}" if tied else "")
            + f". vs best: {sig['test']}, Holm-corrected across rows; ≈ best when p >= {sig['alpha']}."
        )
        notes.append("seeds p: Welch's t over the seeds' values. The item test asks whether these eval items "
                     "separate two configurations; the seed test whether other seeds would. A row worse on items "
                     "but with seeds p >= 0.05 may change rank with more seeds.")
    elif sig.get("untestable_rows"):
        notes.append("vs best: not tested (no per-example predictions for this metric; rank by an eval_* metric).")
    return notes


def to_html(table: Table) -> str:
    headers, body = _grid(table, lambda s: f"\x00{s}\x01")

    def cell(text: str, tag: str) -> str:
        escaped = html.escape(text).replace("\x00", "<strong>").replace("\x01", "</strong>")
        return f"<{tag}>{escaped}</{tag}>"

    rows = ["<tr>" + "".join(cell(h, "th") for h in headers) + "</tr>"]
    rows += ["<tr>" + "".join(cell(c, "td") for c in line) + "</tr>" for line in body]
    title = html.escape(f"sweep {table.sweep}: ranked by {table.metric} ({table.goal})")
    return f"<table>\n<caption>{title}</caption>\n" + "\n".join(rows) + "\n</table>\n"


def to_csv(table: Table) -> str:
    """One line per row with raw numbers (no units, no marks), for pandas or a spreadsheet."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["variant", *table.by, "finished", "failed", "unfinished", "trainable_params",
            "ci_low", "ci_high", "p_vs_best", "tied_with_best"]
    for c in table.columns:
        head += [c.key, f"{c.key}_std", f"{c.key}_n", f"{c.key}_best"]
    head += ["best_hyperparameters", "best_trial_id", "best_trial_run", "approx_extra_params", "key_strength", "best_for"]
    w.writerow(head)
    for r in table.rows:
        st = r.stats
        line: list[Any] = [r.variant, *[r.by[f] for f in table.by], r.finished, r.failed, r.other, r.trainable_params,
                           *((st.ci_low, st.ci_high, st.p_vs_best, st.tied_with_best) if st else (None,) * 4)]
        for c in table.columns:
            cell = r.cells[c.key]
            line += [cell.value, cell.std, cell.n, cell.best]
        line += [json.dumps(r.best_config, sort_keys=True), r.best_trial_id, r.best_trial_run, r.approx_extra_params, r.key_strength, r.best_for]
        w.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def render(table: Table, fmt: str) -> str:
    if fmt == "md":
        return to_markdown(table)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "html":
        return to_html(table)
    if fmt == "json":
        return json.dumps(table.to_json(), indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


# --- logging back to the sweep --------------------------------------------------------


def log_to_parent(client: MlflowClient, table: Table, plots: Sequence[Path] = ()) -> None:
    """Attach the table (md, csv, json) and plots to the sweep's parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = [folder / "COMPARISON.md", folder / "comparison.csv", folder / "comparison.json"]
        files[0].write_text(to_markdown(table))
        files[1].write_text(to_csv(table))
        files[2].write_text(render(table, "json"))
        attach_to_parent(client, table.parent_run_id, [*files, *map(Path, plots)])
