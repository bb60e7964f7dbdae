"""What every suite writes: ``DIR/analysis/<suite>.json``, ``<suite>.png`` and its section of
``DIR/analysis/report.md`` (rebuilt from every suite's JSON, so suites can run in any order)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from oppu import fsutil

SUITE_ORDER = ("behaviour-shift", "activity", "k-sweep", "history-format", "peft-methods",
               "adapter-similarity", "training-cost")


@dataclass
class SuiteResult:
    """One suite's outcome: ``data`` goes to JSON, ``section`` (Markdown) into report.md."""

    suite: str
    title: str
    section: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def save_suite(run_dir: str, result: SuiteResult, figure) -> dict[str, str]:
    """Write the suite's JSON and PNG and rebuild report.md; returns the three URIs."""
    import matplotlib.pyplot as plt

    out = fsutil.join(run_dir, "analysis")
    png = fsutil.join(out, f"{result.suite}.png")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    fs, path = fsutil.filesystem(png)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    record = {"suite": result.suite, "title": result.title, "section": result.section,
              "seconds": round(result.seconds, 1), "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "plot": f"{result.suite}.png", **result.data}
    json_uri = fsutil.join(out, f"{result.suite}.json")
    fsutil.write_json(json_uri, record)
    return {"json": json_uri, "png": png, "report": write_report(run_dir)}


def write_report(run_dir: str) -> str:
    """report.md: one section per suite that has a JSON, in the paper's order."""
    out = fsutil.join(run_dir, "analysis")
    lines = ["# OPPU analyses", "", f"Run: `{run_dir}`. Each section: `oppu analyze --suite NAME "
             f"--run {run_dir}`; numbers in `NAME.json`.", ""]
    for suite in SUITE_ORDER:
        uri = fsutil.join(out, f"{suite}.json")
        if not fsutil.exists(uri):
            continue
        record = fsutil.read_json(uri)
        lines += [f"## {record['title']} (`{suite}`)", "", record["section"].rstrip(), "",
                  f"![{suite}]({record['plot']})", "", f"*{record['seconds']:.0f}s, {record['created']}*", ""]
    report = fsutil.join(out, "report.md")
    fsutil.write_text(report, "\n".join(lines))
    return report


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(width: float = 7.0, height: float = 4.2, columns: int = 1):
    """(figure, axes) on the Agg backend; ``axes`` is a list when ``columns`` > 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width, height))
    return figure, (list(axes) if columns > 1 else axes)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str,
                 xlabel: str, ylabel: str):
    """One group of bars per entry of ``groups``, one bar (and legend entry) per series."""
    import numpy as np

    figure, axes = new_figure()
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        bars = axes.bar(positions + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(positions, list(groups))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)
    return figure


def lines(x: Sequence[float], series: Mapping[str, Sequence[float]], *, title: str, xlabel: str,
          ylabel: str):
    figure, axes = new_figure()
    for name, values in series.items():
        axes.plot(list(x), list(values), marker="o", label=name)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure
