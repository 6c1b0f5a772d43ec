"""The experiment ledger (stages/ledger.py): recorded rows survive a clone without DVC refs,
a live run wins over its recorded copy, and the report marks what is recorded."""
from __future__ import annotations

import json

import pytest

import stages.report as rep
from stages.ledger import read_ledger, record_rows, with_ledger, write_ledger
from test_report import exp_sample, params, write_metrics  # noqa: F401  (params: a fixture)


def live_rows(params):
    return rep.parse_exp_show(exp_sample(), rep.metric_sources(params))


def test_record_keeps_experiments_only_and_replaces_the_same_run(params):
    live = live_rows(params)
    exps = [r for r in live if r["kind"] == "experiment"]
    ledger = record_rows([], live, "2026-12-02")
    assert len(ledger) == len(exps) and all(r["recorded"] == "2026-12-02" for r in ledger)
    old = {**exps[0], "finetune_top1": 1.0, "recorded": "2026-11-30"}
    other = {**exps[0], "rev": "abcdef0", "recorded": "2026-11-30"}  # same name, another run: kept
    again = record_rows([old, other], live, "2026-12-03")
    mine = [r for r in again if r["name"] == exps[0]["name"]]
    assert len(again) == len(exps) + 1 and len(mine) == 2
    assert {r["rev"]: r["finetune_top1"] for r in mine} == {exps[0]["rev"]: exps[0]["finetune_top1"], "abcdef0": exps[0]["finetune_top1"]}
    assert [r["recorded"] for r in mine if r["rev"] == exps[0]["rev"]] == ["2026-12-03"]


def test_with_ledger_adds_only_what_is_not_live(params):
    live = live_rows(params)
    exps = [r for r in live if r["kind"] == "experiment"]
    gone = {**exps[0], "name": "lost-run", "rev": "1234567", "recorded": "2026-12-01"}
    ledger = record_rows([gone], live, "2026-12-02")
    rows = with_ledger(live, ledger)
    assert rows[:len(live)] == live  # live first: the run judged where both exist
    extra = rows[len(live):]
    assert [r["name"] for r in extra] == ["lost-run"] and extra[0]["from_ledger"] and extra[0]["kind"] == "experiment"
    assert with_ledger(None, [gone])[0]["name"] == "lost-run"
    assert with_ledger(live, []) is live


def test_ledger_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "exp.jsonl"
    assert read_ledger(path) == [] and read_ledger(None) == []
    rows = [{"name": "a", "rev": "1"}, {"name": "b", "rev": "2", "seed": 1}]
    write_ledger(path, rows)
    assert read_ledger(path) == rows
    path.write_text(path.read_text() + "\n{not json\n")
    with pytest.raises(ValueError, match=r"exp.jsonl:4: not JSON"):
        read_ledger(path)
    path.write_text(json.dumps({"rev": "1"}) + "\n")
    with pytest.raises(ValueError, match="needs at least a name and a rev"):
        read_ledger(path)


def test_report_records_then_reads_the_ledger_back_marked(tmp_path, params):
    write_metrics(tmp_path, params)
    rep.report(params, exp_json=exp_sample(), root=tmp_path, record_as="2026-12-02")
    ledger = tmp_path / params.report.ledger
    recorded = read_ledger(ledger)
    assert len(recorded) == sum(r["kind"] == "experiment" for r in live_rows(params))
    # a clone without the DVC refs: no live experiments, the recorded rows still make the table
    summary = rep.report(params, exp_json=[], root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    assert summary["experiments"] == len(recorded)
    assert f"{recorded[0]['name']} (recorded 2026-12-02, on " in md
    assert f"0 from `dvc exp show --json`, {len(recorded)} recorded in the ledger" in md
