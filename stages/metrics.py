"""Metric files the DVC stages write: a per-step TSV (DVC plots), a final JSON
(DVC metrics), and a PNG of the curves for people."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Optional


class TsvLog:
    """Append-only TSV with a fixed header; `truncate_after(step)` drops rows a
    resumed run is about to recompute."""

    def __init__(self, path: str | Path, columns: Iterable[str]):
        self.path, self.columns = Path(path), list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("\t".join(self.columns) + "\n")

    def truncate_after(self, step: int) -> None:
        rows = self.rows()
        kept = [r for r in rows if int(float(r["step"])) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept)

    def rows(self) -> list[dict]:
        with self.path.open() as f:
            return list(csv.DictReader(f, delimiter="\t"))

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns, delimiter="\t")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write("\t".join(_fmt(row.get(c)) for c in self.columns) + "\n")


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def plot_curves(tsv: str | Path, png: str | Path, ys: list[str], title: str,
                x: str = "step", logy: Optional[set[str]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.2), squeeze=False)
    for ax, y in zip(axes[0], ys):
        pts = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy and y in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
