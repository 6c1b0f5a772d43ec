"""Markdown cells and tables shared by the report's sections (stages/report.py, stages/seg_report.py).

Its own module because seg_report is imported by report: the shared formatting cannot live in either."""
from __future__ import annotations

from typing import Optional


def table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def mean_sd(d: dict) -> str:
    """A stages/claims.py `spread` dict as "mean ± sd" ("—" without values, the mean alone with one)."""
    if d["mean"] is None:
        return "—"
    return f"{d['mean']:.2f}" if d["sd"] is None else f"{d['mean']:.2f} ± {d['sd']:.2f}"


def gap_cell(gap: Optional[float], sd: Optional[float]) -> str:
    """A signed gap in points with its sd, as the claims tables show it."""
    if gap is None:
        return "—"
    return f"{gap:+.2f}" + ("" if sd is None else f" ± {sd:.2f}")


def signed_cell(v: Optional[float]) -> str:
    """A t statistic (or a ratio) with its sign, one decimal."""
    return "—" if v is None else f"{v:+.1f}"
