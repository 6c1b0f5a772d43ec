"""Metric files the DVC stages write: a per-step TSV (DVC plots) and a final JSON
(DVC metrics); the pictures of them are in stages/figures.py."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from pipeline.atomic import atomic_file, atomic_write


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
        with atomic_file(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns, delimiter="\t")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(tsv_line(self.columns, row))


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def tsv_line(columns: Iterable[str], row: dict) -> str:
    return "\t".join(_fmt(row.get(c)) for c in columns) + "\n"


def tsv_text(columns: Iterable[str], rows: Iterable[dict]) -> str:
    """A whole TSV (header + rows), formatted as TsvLog writes it."""
    columns = list(columns)
    return "\t".join(columns) + "\n" + "".join(tsv_line(columns, r) for r in rows)


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish_curve(log: str | Path, curve: str | Path) -> None:
    """Copy a run's step log (under outputs.runs, untracked) to the DVC plot path."""
    atomic_write(curve, Path(log).read_bytes())


def topk_hits(scores, labels) -> tuple:
    """scores [M, K], labels [M] -> (bool [M] correct at top-1, bool [M] correct at top-5),
    top-k capped at K. Probes average them; fine-tuning sums them over batches and ranks."""
    k = min(5, scores.shape[1])
    hit = scores.topk(k, dim=-1).indices == labels[:, None]  # [M, k]
    return hit[:, 0], hit.any(-1)
