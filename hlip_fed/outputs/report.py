"""Readable summaries of a federated run: the round table and the curves (``metrics.jsonl``)."""

from __future__ import annotations

import base64
import html
import json
import logging
import shutil
import threading
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hlip_fed.atomic import write_atomic
from hlip_fed.federation.round_record import RoundRecord

log = logging.getLogger(__name__)

CURVES = (
    ("train", "train-loss", "local training loss"),
    ("heldout", "auc-mean", "held-out zero-shot AUC (mean)"),
    ("heldout", "r5", "held-out retrieval R@5"),
    ("eval", "auc-mean", "site test zero-shot AUC (mean)"),
)


def read_rounds(run_dir: str | Path) -> list[RoundRecord]:
    """One record per completed round; a repeated round (after a resume) keeps its last record. The
    sites' evaluation of a round's model that came with the next round's training replies
    (``previous_eval``) is given to the round whose model it evaluated."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rounds: dict[int, RoundRecord] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = RoundRecord.from_json(json.loads(line))
            rounds[int(rec.round)] = rec
    for rec in rounds.values():
        carried = rec.previous_eval or {}
        evaluated = rounds.get(int(carried.get("round", -1)))
        if evaluated is not None and evaluated.eval is None:
            evaluated.eval, evaluated.eval_sites = carried.get("eval"), carried.get("eval_sites")
            rec.previous_eval = None
    return [rounds[k] for k in sorted(rounds)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the run's curves to ``curves.png`` (or ``out``) atomically; nothing before the first
    round. Draws without pyplot's global state, so a background thread may call it."""
    rounds = read_rounds(run_dir)
    if not rounds:
        return None
    fig = Figure(figsize=(4 * len(CURVES), 3.2))
    axes = fig.subplots(1, len(CURVES))
    for ax, (section, key, title) in zip(axes, CURVES):
        xs = [r.round for r in rounds if key in r.section(section)]
        ys = [r.section(section)[key] for r in rounds if key in r.section(section)]
        ax.plot(xs, ys, marker="o")
        if key.startswith("auc-"):
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return path


class CurvePlotter:
    """Redraws a run's curves in a background thread, off the critical path of its rounds.

    ``request`` asks for a drawing of what ``metrics.jsonl`` holds by then; requests made while a
    drawing runs fold into one more. ``close`` waits for the last drawing. A failed drawing is
    logged, never raised: the curves are a view of the run, not part of it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._wanted, self._closing = threading.Event(), False
        self._thread = threading.Thread(target=self._draw, name="curves", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def _draw(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                plot_run(self.run_dir)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                log.warning("the curves of %s were not drawn: %s", self.run_dir, exc)
            if self._closing and not self._wanted.is_set():
                return

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()


# --- the round table, the run report and TensorBoard ------------------------------------------
TABLE_COLUMNS = (
    ("round", None, "round", "{:d}"),
    ("train loss", "train", "train-loss", "{:.3f}"),
    ("held-out AUC", "heldout", "auc-mean", "{:.3f}"),
    ("R@1", "heldout", "r1", "{:.3f}"),
    ("R@5", "heldout", "r5", "{:.3f}"),
    ("R@10", "heldout", "r10", "{:.3f}"),
    ("site AUC", "eval", "auc-mean", "{:.3f}"),
)


def sites_seconds(record: RoundRecord) -> float | None:
    """Seconds from sending a round's training to the last site's reply (the round's ``timing``)."""
    waits = [max(ex["replies_s"], default=0.0) for ex in (record.timing or {}).get("exchanges", [])
             if ex.get("type") == "train"]
    return waits[0] if waits else None


def round_table(rounds: list[RoundRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the round table (``-`` where a round lacks a metric)."""
    header = [c[0] for c in TABLE_COLUMNS] + ["sites", "rejected", "sites s"]
    rows = []
    for r in rounds:
        row = []
        for _, section, key, fmt in TABLE_COLUMNS:
            value = getattr(r, key) if section is None else r.section(section).get(key)
            row.append(fmt.format(value) if isinstance(value, (int, float)) else "-")
        wait = sites_seconds(r)
        row += [str(len(r.train_sites or {})), str(len(r.rejected or [])),
                "-" if wait is None else f"{wait:.1f}"]
        rows.append(row)
    return header, rows


def format_row(cells: list[str], widths: list[int]) -> str:
    """One line of the round table, each cell right-aligned to its column's width."""
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def format_round_table(rounds: list[RoundRecord]) -> str:
    header, rows = round_table(rounds)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    return "\n".join(format_row(cells, widths) for cells in [header, *rows])


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def write_run_report(run_dir: str | Path, fmt: str = "html", out: str | Path | None = None) -> Path:
    """A self-contained summary of a run: the round table, the curves and the model card.

    ``fmt="html"`` embeds the curves PNG as base64 so the one file can be mailed or archived;
    ``fmt="md"`` links the ``curves.png`` written beside it.
    """
    if fmt not in ("html", "md"):
        raise ValueError(f"report format must be html or md, not {fmt!r}")
    run = Path(run_dir)
    rounds = read_rounds(run)
    path = Path(out) if out else run / f"report.{fmt}"
    curves = plot_run(run, path.with_name("curves.png") if out else None)
    header, rows = round_table(rounds)
    card = run / "model" / "MODEL_CARD.md"
    card_text = card.read_text() if card.is_file() else None
    last = rounds[-1] if rounds else RoundRecord()
    summary = (f"{len(rounds)} completed round(s); final model "
               + ("in model/" if (run / "model" / "model.safetensors").is_file() else "not saved yet"))
    if fmt == "md":
        parts = [f"# Run report: {run.name}", "", summary, "", _markdown_table(header, rows), ""]
        if curves:
            parts += [f"![curves]({curves.name})", ""]
        if last.rejected:
            parts += ["Rejected updates in the last round:", "",
                      *[f"- node {x.get('node')}: {x.get('reason')}" for x in last.rejected], ""]
        if card_text:
            parts += ["---", "", card_text.replace("# Model card", "## Model card", 1)]
        path.write_text("\n".join(parts))
        return path
    esc = html.escape
    table = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    img = ""
    if curves:
        data = base64.b64encode(curves.read_bytes()).decode()
        img = f'<p><img alt="curves" src="data:image/png;base64,{data}" style="max-width:100%"></p>'
    card_html = f"<h2>Model card</h2><pre>{esc(card_text)}</pre>" if card_text else ""
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>hlip-fed run {esc(run.name)}</title><style>body{{font-family:sans-serif;margin:2em;max-width:70em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}</style></head><body>"
        f"<h1>Run report: {esc(run.name)}</h1><p>{esc(summary)}</p>{table}{img}{card_html}</body></html>")
    return path


_WRITERS: dict[str, object] = {}


def _section_scalars(section: str, metrics: dict | None) -> dict[str, float]:
    """``section/metric -> value`` of one metrics section's numbers (counts left out)."""
    return {f"{section}/{key}": float(value) for key, value in (metrics or {}).items()
            if isinstance(value, (int, float)) and not key.endswith("-count")}


def _scalars(record: dict) -> dict[str, float]:
    """``section/metric -> value`` of a round record's numeric metrics (per-site detail left out)."""
    out = {}
    for section in ("train", "heldout", "eval"):
        out.update(_section_scalars(section, record.get(section)))
    out["sites/trained"] = float(len(record.get("train_sites") or {}))
    out["sites/rejected"] = float(len(record.get("rejected") or []))
    return out


def tensorboard_round(run_dir: str | Path, record: dict) -> bool:
    """Add one round's metrics to the TensorBoard event files in ``RUN_DIR/tensorboard``.

    Called once per completed round (``record`` is the line written to ``metrics.jsonl``, with its
    ``round``). Returns False, once logging why, when TensorBoard is not installed: the run goes on.
    """
    key = str(Path(run_dir).resolve())
    writer = _WRITERS.get(key)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
        except ImportError:
            if key not in _WRITERS:
                logging.getLogger("hlip_fed.outputs.report").warning(
                    "tensorboard is not installed: no event files (pip install tensorboard)")
                _WRITERS[key] = False
            return False
        writer = _WRITERS[key] = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    if writer is False:
        return False
    step = int(record["round"])
    for tag, value in _scalars(record).items():
        writer.add_scalar(tag, value, step)
    carried = record.get("previous_eval")
    if carried:  # the sites' evaluation of an earlier round's model, at that round's step
        for tag, value in _section_scalars("eval", carried.get("eval")).items():
            writer.add_scalar(tag, value, int(carried["round"]))
    writer.flush()
    return True


def export_tensorboard(run_dir: str | Path) -> Path | None:
    """Rewrite ``RUN_DIR/tensorboard`` from ``metrics.jsonl`` (for runs made before the hook)."""
    run = Path(run_dir)
    rounds = read_rounds(run)
    if not rounds:
        return None
    close_tensorboard(run)
    shutil.rmtree(run / "tensorboard", ignore_errors=True)
    ok = all(tensorboard_round(run, r.to_json()) for r in rounds)
    close_tensorboard(run)
    return run / "tensorboard" if ok else None


def close_tensorboard(run_dir: str | Path) -> None:
    writer = _WRITERS.pop(str(Path(run_dir).resolve()), None)
    if writer:
        writer.close()
