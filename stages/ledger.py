"""The experiment ledger: recorded DVC experiment rows, committed, so results outlive their refs.

`dvc exp run` keeps an experiment as a git ref and its outputs in the DVC cache of the
machine that ran it; a fresh clone has neither, so a report regenerated there would lose
every ablation and seed. `beit report --record` writes each experiment row the report
parsed from `dvc exp show --json` (stages/report.py: the knobs and metrics, nothing else)
into `report.ledger` (JSON lines, committed), and every report reads the ledger back
beside the live experiments. A recorded row says when it was recorded and on which
baseline commit it ran; the report's table marks it, so nothing recorded passes for a run
of the code at hand.

`record_rows` and `with_ledger` are pure functions over rows; `read_ledger` / `write_ledger`
are the file's only readers and writers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pipeline.atomic import atomic_write


def read_ledger(path: Optional[str | Path]) -> list[dict]:
    """The recorded rows (one JSON object a line, blank lines skipped); [] when there is no file.
    A line that is not a JSON object is an error naming the file and line: a silently
    dropped row would change a verdict."""
    if path is None or not Path(path).exists():
        return []
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{i}: not JSON ({err}); fix or delete the line") from None
        if not isinstance(row, dict) or not row.get("name") or not row.get("rev"):
            raise ValueError(f"{path}:{i}: a ledger row needs at least a name and a rev")
        rows.append(row)
    return rows


def _key(row: dict) -> tuple[str, str]:
    return str(row.get("name")), str(row.get("rev"))


def record_rows(ledger: list[dict], live: list[dict], recorded: str) -> list[dict]:
    """The ledger with the live experiments written in: a live row replaces the recorded row of
    the same (name, rev), others are kept; failed experiments and non-experiment rows
    (workspace, baselines) are not recorded. Sorted by (baseline, name, rev): stable diffs."""
    out = {_key(r): r for r in ledger}
    for r in live:
        if r.get("kind") == "experiment" and not r.get("error"):
            out[_key(r)] = {**r, "recorded": recorded}
    return sorted(out.values(), key=lambda r: (str(r.get("baseline")), *_key(r)))


def with_ledger(live: Optional[list[dict]], ledger: list[dict]) -> Optional[list[dict]]:
    """Live rows, then each recorded row whose (name, rev) is not live, marked `from_ledger`.
    Live rows come first, so where a (variant, seed) has both, the live run is the one judged."""
    if not ledger:
        return live
    have = {_key(r) for r in live or []}
    extra = [{**r, "kind": "experiment", "from_ledger": True} for r in ledger if _key(r) not in have]
    return [*(live or []), *extra]


def write_ledger(path: str | Path, rows: list[dict]) -> None:
    atomic_write(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
