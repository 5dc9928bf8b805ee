"""Turning samples into a verdict a reader can trust: medians, spread, ratios, table, JSON, PNG.

Ratios are *performance* ratios: above 1 means the subject (x2ssh) did better than the baseline, whatever
the metric's direction (throughput: subject/baseline; latency or time: baseline/subject). A ratio is marked
untrustworthy when either side has fewer than 3 samples or a relative spread ((max - min) / median) above
`SPREAD_LIMIT`.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

log = logging.getLogger(__name__)

SPREAD_LIMIT = 0.15
MIN_TRUSTED_SAMPLES = 3


@dataclass
class Summary:
    """Statistics of one (metric, transport) cell."""

    metric: str
    transport: str
    n: int
    median: float | None
    low: float | None
    high: float | None
    spread: float | None  # (max - min) / |median|
    errors: list[str]

    @property
    def trusted(self) -> bool:
        return self.n >= MIN_TRUSTED_SAMPLES and self.spread is not None and self.spread <= SPREAD_LIMIT


def summarize(samples: list[dict[str, Any]]) -> dict[tuple[str, str], Summary]:
    """Group samples by (metric, transport); errors are kept, values missing from them are not counted."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for sample in samples:
        cells.setdefault((sample["metric"], sample["transport"]), []).append(sample)
    result = {}
    for (metric, transport), group in cells.items():
        values = [s["value"] for s in group if s.get("value") is not None]
        errors = [s["error"] for s in group if s.get("error")]
        median = statistics.median(values) if values else None
        low, high = (min(values), max(values)) if values else (None, None)
        spread = None
        if median not in (None, 0) and low is not None and high is not None:
            spread = (high - low) / abs(median)
        elif median == 0 and values:
            spread = 0.0 if high == low else None
        result[(metric, transport)] = Summary(
            metric, transport, len(values), median, low, high, spread, errors
        )
    return result


def performance_ratio(subject: Summary, baseline: Summary, better: str) -> float | None:
    """> 1 means the subject did better (see module docstring); None when undefined."""
    if subject.median is None or baseline.median is None:
        return None
    if better == "higher":
        return subject.median / baseline.median if baseline.median else None
    return baseline.median / subject.median if subject.median else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell_text(summary: Summary | None, status: str) -> str:
    """A table cell: "median ±spread%", or why there is no number."""
    if status != "ok":
        return status
    if summary is None:
        return "n/a"
    if summary.median is None:
        return "[red]error[/red]" if summary.errors else "—"
    spread = f" ±{summary.spread * 100:.0f}%" if summary.spread is not None and summary.n > 1 else ""
    warn = "" if summary.trusted or summary.n < 2 else " [yellow]![/yellow]"
    return f"{_fmt(summary.median)}{spread}{warn}"


def ratio_rows(
    metrics: list[dict[str, Any]],
    summaries: dict[tuple[str, str], Summary],
    subject: str,
    baselines: list[str],
) -> list[dict[str, Any]]:
    """One entry per (metric, baseline) with the subject's performance ratio and whether it is trusted."""
    rows = []
    for metric in metrics:
        for baseline in baselines:
            mine, theirs = summaries.get((metric["key"], subject)), summaries.get((metric["key"], baseline))
            if mine is None or theirs is None:
                continue
            rows.append(
                {
                    "metric": metric["key"],
                    "subject": subject,
                    "baseline": baseline,
                    "ratio": performance_ratio(mine, theirs, metric["better"]),
                    "trusted": mine.trusted and theirs.trusted,
                }
            )
    return rows


def render(console: Console, doc: dict[str, Any]) -> None:
    """Print the absolute table and the ratio table of a results document."""
    summaries = {(s["metric"], s["transport"]): Summary(**s) for s in doc["summary"]}
    transports = [t["name"] for t in doc["transports"]]
    status = {t["name"]: _status_text(t) for t in doc["transports"]}
    table = Table(title="x2ssh benchmark: medians (±relative spread; ! = spread too high to trust)")
    table.add_column("metric")
    table.add_column("unit")
    for name in transports:
        table.add_column(name, justify="right")
    for metric in doc["metrics"]:
        cells = []
        for name in transports:
            summary = summaries.get((metric["key"], name))
            cells.append(cell_text(summary, status[name]) if summary or status[name] != "ok" else "n/a")
        table.add_row(metric["label"], metric["unit"], *cells)
    console.print(table)

    ratios = doc["ratios"]
    if ratios:
        subject = ratios[0]["subject"]
        baselines = list(dict.fromkeys(r["baseline"] for r in ratios))
        rt = Table(
            title=f"{subject} ÷ baseline (performance ratio, > 1 = {subject} better; ! = untrustworthy)"
        )
        rt.add_column("metric")
        for name in baselines:
            rt.add_column(f"vs {name}", justify="right")
        by_cell = {(r["metric"], r["baseline"]): r for r in ratios}
        for metric in doc["metrics"]:
            row = [by_cell.get((metric["key"], b)) for b in baselines]
            if not any(r and r["ratio"] is not None for r in row):
                continue
            texts = []
            for r in row:
                if r is None or r["ratio"] is None:
                    texts.append("—")
                else:
                    texts.append(f"{r['ratio']:.2f}x" + ("" if r["trusted"] else " [yellow]![/yellow]"))
            rt.add_row(metric["label"], *texts)
        console.print(rt)
    for t in doc["transports"]:
        if t["status"] != "ok":
            console.print(f"[yellow]{t['name']}: {t['status']}[/yellow] {escape(t.get('reason', ''))}")


def _status_text(transport: dict[str, Any]) -> str:
    return "ok" if transport["status"] == "ok" else "[yellow]unavail.[/yellow]"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def summaries_for_json(summaries: dict[tuple[str, str], Summary]) -> list[dict[str, Any]]:
    return [asdict(s) for s in summaries.values()]


def write_chart(path: Path, doc: dict[str, Any]) -> str | None:
    """Bar chart of the performance ratios; returns why it was skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (it is in the `bench` extra: pip install -e '.[bench]')"
    ratios = [r for r in doc["ratios"] if r["ratio"] is not None]
    labels = {m["key"]: m["label"] for m in doc["metrics"]}
    if not ratios:
        return "no ratios to chart"
    metrics = list(dict.fromkeys(r["metric"] for r in ratios))
    baselines = list(dict.fromkeys(r["baseline"] for r in ratios))
    by_cell = {(r["metric"], r["baseline"]): r["ratio"] for r in ratios}
    fig, ax = plt.subplots(figsize=(10, 0.18 * len(metrics) * max(1, len(baselines)) + 1.5))
    height = 0.8 / max(1, len(baselines))
    for i, baseline in enumerate(baselines):
        ys = [m + i * height for m in range(len(metrics))]
        xs = [by_cell.get((metric, baseline)) or float("nan") for metric in metrics]
        ax.barh(ys, xs, height=height, label=f"vs {baseline}")
    ax.set_xscale("log")  # 0.5x and 2x are equally far from parity
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([m + 0.4 - height / 2 for m in range(len(metrics))])
    ax.set_yticklabels([labels.get(m, m) for m in metrics], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"performance ratio of {ratios[0]['subject']} (> 1 = better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
