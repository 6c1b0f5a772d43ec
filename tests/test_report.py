"""`beit report`: metrics beside the paper's, and the `dvc exp show --json` ablation table.

tests/data/dvc_exp_show*.json were recorded with dvc 3.67.1 in a scratch DVC repo
(params.yaml with the top-level seed/mask_ratio/masking/target keys, a stage writing
metrics/finetune.json + metrics/scratch.json + metrics/pretrain.json, then
`dvc exp run -S ...` four times), so the parser is tested on dvc's real format.
"""
import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from stages import report as rep
from stages.config import load_params

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml")


def exp_sample(name="dvc_exp_show.json", repo_params=True):
    """The recording; with `repo_params`, each run's params tree is this repo's params.yaml
    with the run's own knobs (the recording's scratch repo had a toy params file, which
    stages/recipe.py cannot fingerprint, so no row would share the report's recipe)."""
    raw = json.loads((DATA / name).read_text())
    if repo_params:
        base = yaml.safe_load((REPO / "params.yaml").read_text())
        entries = [top for top in raw] + [rev for top in raw for exp in top.get("experiments") or []
                                          for rev in exp.get("revs") or []]
        for entry in entries:
            files = (entry.get("data") or {}).get("params") or {}
            if "params.yaml" in files:
                own = files["params.yaml"]["data"]
                files["params.yaml"]["data"] = {**copy.deepcopy(base),
                                                **{k: own[k] for k in rep.EXP_PARAMS if k in own}}
    return raw


def write_metrics(root: Path, params,
                  names=("tokenizer", "pretrain", "finetune", "scratch", "linear_probe", "knn", "segment", "visualize")):
    values = {
        "tokenizer": {"kind": "dvae", "codebook_usage": 0.5, "codebook_usage_pct": 50.0, "perplexity": 301.5,
                      "recon_mse": 0.0123},
        "pretrain": {"eval_acc": 0.31, "eval_loss": 4.5, "train_loss": 4.2, "steps": 100},
        "finetune": {"top1": 0.85, "top5": 0.99, "label_fraction": 0.1},
        "scratch": {"top1": 0.80, "top5": 0.98},
        "linear_probe": {"top1": 0.62, "top5": 0.9},
        "knn": {"top1": 0.70, "top5": 0.95},
        "segment": {"miou": 0.42, "pixel_acc": 0.9, "init": "pretrain", "eval_scenes": 500},
        "visualize": {"images": 10, "images_scored": 10, "pretrain_mass": 0.7, "random_mass": 0.5,
                      "finetune_mass": 0.6, "chance_mass": 0.5},
    }
    sources = rep.metric_sources(params)
    for n in names:
        path = root / sources[n]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values[n]))


def table_row(md: str, first_cells: str) -> list[str]:
    """Cells of the first Markdown table row starting with `| first_cells |`."""
    for line in md.splitlines():
        if line.startswith(f"| {first_cells} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {first_cells!r} in:\n{md}")


# ---- the experiments parser, on dvc's real output ---------------------------------------------

def test_parse_recorded_exp_show(params):
    rows = rep.parse_exp_show(exp_sample(), rep.metric_sources(params))
    # scratch (which reads no pretraining-variant param) only on the default variant's rows
    got = [g[:-1] + (None if g[-1] is None else round(g[-1], 2),) for g in
           [(r["kind"], r["name"], r["rev"], r["mask_ratio"], r["masking"], r["target"], r["seed"],
             round(r["finetune_top1"], 2), r["scratch_top1"]) for r in rows]]
    # the workspace equals the baseline commit here (a reproduced HEAD): listed once, as the baseline
    assert got == [
        ("baseline", "master", "0832c60", 0.4, "block", "tokens", 0, 80.0, 70.0),
        ("experiment", "elfin-duff", "e952797", 0.4, "random", "pixels", 0, 73.0, None),
        ("experiment", "gusty-tang", "74d8f79", 0.4, "block", "pixels", 0, 75.0, None),
        ("experiment", "aided-bags", "c82843c", 0.4, "random", "tokens", 0, 78.0, None),
        ("experiment", "laced-adze", "55964a5", 0.3, "block", "tokens", 0, 70.0, None),
    ]
    assert all(r["baseline"] == "master" for r in rows if r["kind"] == "experiment")
    # frozen-feature columns: this recording has pretrain metrics but no probe/kNN files
    assert rows[1]["mim_acc"] == pytest.approx(20.0) and rows[1]["linear_probe_top1"] is None


def test_parse_keeps_a_workspace_that_differs(params):
    raw = exp_sample()
    assert raw[0]["rev"] == "workspace"
    raw[0]["data"]["params"]["params.yaml"]["data"]["mask_ratio"] = 0.3  # an uncommitted change
    rows = rep.parse_exp_show(raw, rep.metric_sources(params))
    assert [(r["kind"], r["mask_ratio"]) for r in rows[:2]] == [("workspace", 0.3), ("baseline", 0.4)]


def test_parse_without_experiments(params):
    rows = rep.parse_exp_show(exp_sample("dvc_exp_show_no_exps.json"), rep.metric_sources(params))
    assert [r["kind"] for r in rows] == ["baseline"]


@pytest.mark.parametrize("raw", [None, {}, "x", [1, None, {"rev": "abc"}], [{"rev": "r", "data": None,
                                 "error": {"type": "X", "msg": "bad"}, "experiments": [{"revs": []}, 3]}]])
def test_parse_is_robust(params, raw):
    assert rep.parse_exp_show(raw, rep.metric_sources(params)) == []


def test_parse_missing_metric_and_params_give_none(params):
    raw = exp_sample()
    exp = raw[1]["experiments"][0]["revs"][0]["data"]
    del exp["metrics"]["metrics/scratch.json"]
    exp["params"]["params.yaml"]["data"].pop("seed")
    rows = {r["name"]: r for r in rep.parse_exp_show(raw, rep.metric_sources(params))}
    exp = rows["elfin-duff"]
    assert exp["scratch_top1"] is None and exp["seed"] is None and exp["finetune_top1"] == 73.0
    base = raw[1]["data"]
    del base["metrics"]["metrics/scratch.json"]
    rows = {r["name"]: r for r in rep.parse_exp_show(raw, rep.metric_sources(params))}
    assert rows["master"]["scratch_top1"] is None  # default row, file gone


# ---- the report on fake metric files ----------------------------------------------------------

def test_report_all_metrics(tmp_path, params):
    write_metrics(tmp_path, params)
    summary = rep.report(params, exp_json=exp_sample(), root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    png = tmp_path / params.outputs.report.figure
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["experiments"] == 4
    assert summary["metrics_found"] == ["finetune", "knn", "linear_probe", "pretrain", "scratch", "segment",
                                        "tokenizer", "visualize"]
    assert table_row(md, "Segmentation | mIoU (%)")[2:] == ["42.00", "`metrics/segment.json`", "45.6 (BEiT-B, ADE20K)"]
    assert "This run: init pretrain, mIoU 42.00 %" in md
    assert table_row(md, "Fine-tuning | fine-tune top-1 (%)")[2:] == ["85.00", "`metrics/finetune.json`",
                                                                      "83.2 (BEiT-B)"]
    assert table_row(md, "Fine-tuning | scratch top-1 (%)")[2:] == ["80.00", "`metrics/scratch.json`",
                                                                    "81.8 (DeiT-B)"]
    assert table_row(md, "Frozen features | linear probe top-1 (%)")[2] == "62.00"
    assert table_row(md, "Frozen features | kNN top-1 (%)")[2] == "70.00"
    assert table_row(md, "Pretraining | masked-token accuracy, held out (%)")[2:4] == ["31.00",
                                                                                     f"`{params.outputs.pretrain.metrics}`"]
    assert table_row(md, "Pretraining | MIM loss, held out")[2] == "4.5000"
    assert table_row(md, "Tokenizer | code perplexity")[2:4] == ["301.5000", f"`{params.outputs.tokenizer.metrics}`"]
    assert table_row(md, "Tokenizer | codebook usage (% of codes)")[2] == "50.00"
    assert table_row(md, "Tokenizer | reconstruction MSE")[2] == "0.0123"
    assert "fine-tune − scratch = +5.00 points top-1 (paper: +1.4): **same direction as the paper**" in md
    assert "only the direction is" in md.lower() and "Different scales" in md
    assert table_row(md, "BEiT-B (800 ep pretraining)") == ["BEiT-B (800 ep pretraining)", "83.2"]
    assert table_row(md, "DeiT-B from scratch") == ["DeiT-B from scratch", "81.8"]
    assert [table_row(md, v)[3] for v, *_ in rep.PAPER_ABLATION] == ["82.86", "82.77", "81.04", "80.50"]
    recipe = rep.recipe_of(params)
    assert table_row(md, "elfin-duff") == ["elfin-duff", "e952797", f"**{recipe}**", "all", "0.40", "random", "pixels", "0",
                                           "73.00", "—", "—", "—", "—", "20.00", "—"]  # scratch: the default row's
    assert table_row(md, "master (baseline)")[8] == "80.00"
    assert table_row(md, "laced-adze")[4] == "0.30"
    assert "![results](results.png)" in md
    assert "Missing" not in md
    assert "ran another recipe" not in md  # every row is this run's recipe


def test_precision_says_what_the_training_stages_really_ran_in(tmp_path, params):
    """`amp: bf16` trains in fp32 on a CPU without bf16 kernels: the report says which one each
    run's training stages ran in, from their metrics files, and "—" for runs that do not say."""
    assert rep.precision([{"amp": "bf16"}, {"amp": "bf16"}, None]) == "bf16"
    assert rep.precision([{"amp": "none"}, {"amp": "bf16"}, {"amp": "none"}]) == "fp32/bf16"
    assert rep.precision([{"top1": 0.5}, None, {"amp": 3}]) is None
    # a run stopped on one machine and resumed on another (stages/loop.py: FitResult.amp)
    assert rep.precision([{"amp": "none+bf16"}, {"amp": "bf16"}]) == "fp32+bf16/bf16"
    write_metrics(tmp_path, params)
    for name in ("pretrain", "finetune", "scratch"):
        path = tmp_path / rep.metric_sources(params)[name]
        path.write_text(json.dumps({**json.loads(path.read_text()), "amp": "none"}))
    raw = exp_sample()
    rev = raw[1]["experiments"][0]["revs"][0]
    rev["data"]["metrics"]["metrics/finetune.json"]["data"]["amp"] = "bf16"
    rev["data"]["metrics"]["metrics/pretrain.json"]["data"]["amp"] = "none"
    rep.report(params, exp_json=raw, root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    assert md.splitlines()[2].endswith(", seed=0, precision=fp32")
    assert table_row(md, rev["name"])[-1] == "fp32/bf16"
    assert table_row(md, "laced-adze")[-1] == "—"


def test_rows_of_another_recipe_are_listed_but_not_pooled(tmp_path, params):
    """A recipe change (here the fine-tuning views) must not average old runs with new ones."""
    write_metrics(tmp_path, params)
    raw = exp_sample()
    for exp in raw[1]["experiments"]:
        for rev in exp["revs"]:
            if rev["data"]["params"]["params.yaml"]["data"]["masking"] == "random":
                rev["data"]["params"]["params.yaml"]["data"]["finetune"]["views"]["scale"] = [0.6, 1.0]
    rep.report(params, exp_json=raw, root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    other = table_row(md, "elfin-duff")[2]
    assert other != f"**{rep.recipe_of(params)}**" and re.fullmatch(r"[0-9a-f]{8}", other)
    assert f"row(s) of recipe {other} ran another recipe" in md
    pooled = rep.same_recipe(rep.parse_exp_show(raw, rep.metric_sources(params)), rep.recipe_of(params))
    assert pooled and all(r["masking"] == "block" for r in pooled)


def test_report_some_missing(tmp_path, params):
    write_metrics(tmp_path, params, names=("pretrain", "finetune"))
    summary = rep.report(params, exp_json=exp_sample("dvc_exp_show_no_exps.json"), root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    assert summary["metrics_found"] == ["finetune", "pretrain"] and summary["experiments"] == 0
    assert table_row(md, "Fine-tuning | fine-tune top-1 (%)")[2] == "85.00"
    assert table_row(md, "Fine-tuning | scratch top-1 (%)")[2] == "not run"
    assert table_row(md, "Frozen features | kNN top-1 (%)")[2] == "not run"
    assert ("Missing (stage not run yet): `metrics/tokenizer.json`, `metrics/scratch.json`, "
            "`metrics/linear_probe.json`, `metrics/knn.json`, `metrics/segment.json`, `metrics/visualize.json`.") in md
    assert table_row(md, "Tokenizer | code perplexity")[2] == "not run"
    assert "needs both `finetune` and `scratch` metrics" in md
    assert "No DVC experiments yet" in md and "| experiment | rev |" not in md
    assert (tmp_path / params.outputs.report.figure).exists()


def test_report_nothing_run_and_unreadable_json(tmp_path, params):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/finetune.json").write_text("{not json")
    rep.report(params, exp_json=[], root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    assert table_row(md, "Fine-tuning | fine-tune top-1 (%)")[2] == "not run"


def test_report_says_when_dvc_is_unavailable(tmp_path, params, monkeypatch):
    monkeypatch.setattr(rep.shutil, "which", lambda name: None)
    monkeypatch.setattr(rep.sys, "executable", str(tmp_path / "nowhere" / "python"))
    assert rep.run_dvc_exp_show() == (None, "dvc is not installed (no `dvc` on PATH)")
    rep.report(params, root=tmp_path)
    md = (tmp_path / params.outputs.report.markdown).read_text()
    assert "## DVC experiments" in md and "dvc is not installed" in md


def test_report_says_when_dvc_fails(tmp_path, params, monkeypatch):
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'ERROR: you are not inside of a DVC repository' >&2\nexit 253\n")
    fake.chmod(0o755)
    monkeypatch.setattr(rep.shutil, "which", lambda name: str(fake))
    rep.report(params, root=tmp_path)
    assert "`dvc exp show --json` failed: ERROR: you are not inside of a DVC repository" in \
        (tmp_path / params.outputs.report.markdown).read_text()


def test_metric_paths_follow_params(tmp_path, params):
    fake = SimpleNamespace(outputs=SimpleNamespace(
        pretrain=SimpleNamespace(metrics="m/pre.json"), tokenizer=SimpleNamespace(metrics="metrics/tok.json"),
        finetune=SimpleNamespace(metrics="f.json"), scratch=SimpleNamespace(metrics="s.json"),
        linear_probe=SimpleNamespace(metrics="l.json"), knn=SimpleNamespace(metrics="k.json")))
    sources = rep.metric_sources(fake)
    assert sources["tokenizer"] == "metrics/tok.json" and sources["pretrain"] == "m/pre.json"
    assert (sources["finetune"], sources["scratch"], sources["linear_probe"], sources["knn"]) == (
        "f.json", "s.json", "l.json", "k.json")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/tok.json").write_text(json.dumps(
        {"codebook_usage": 0.5, "perplexity": 301.5, "recon_mse": 0.0123}))
    rows = {r["label"]: r["value"] for r in rep.result_rows(rep.load_metrics(sources, tmp_path))}
    assert rows["codebook usage (% of codes)"] == 50.0
    assert rows["code perplexity"] == 301.5 and rows["reconstruction MSE"] == 0.0123


def test_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "exp.json").write_text((DATA / "dvc_exp_show.json").read_text())
    from stages.cli import main

    result = CliRunner().invoke(main, ["report", "--exp-json", "exp.json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["experiments"] == 4
    result = CliRunner().invoke(main, ["report", "--no-experiments"])
    assert result.exit_code == 0, result.output
    assert "Experiments table disabled" in Path("reports/results.md").read_text()


# ---- the report reads the files the stages write, and DVC orders it after them ----------------

def _resolve(text: str, raw_params: dict) -> str:
    def lookup(m):
        v = raw_params
        for part in m.group(1).split("."):
            v = v[part]
        return str(v)
    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_metric_sources_match_dvc_yaml(params):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    declared = {name: [_resolve(p, raw) for p in _paths(stage.get("metrics"))]
                for name, stage in dvc.items() if isinstance(stage, dict)}
    sources = rep.metric_sources(params)
    for source, stage in [("tokenizer", "train-tokenizer"), ("pretrain", "pretrain"), ("finetune", "finetune"), ("scratch", "scratch"),
                          ("linear_probe", "linear-probe"), ("knn", "knn"), ("segment", "segment"),
                          ("visualize", "visualize")]:
        assert declared[stage] == [sources[source]], stage
    deps = [_resolve(p, raw) for p in _paths(dvc["report"]["deps"])]
    assert {p for p in sources.values() if p} <= set(deps)
    assert "stages/report.py" in deps
    outs = {_resolve(p, raw): opts for e in dvc["report"]["outs"] for p, opts in e.items()}
    assert outs == {params.outputs.report.markdown: {"cache": False}, params.outputs.report.figure: {"cache": False}}


def test_seed_panel_shows_every_seed_the_spread_and_the_pixel_floor():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.claims import by_variant

    def row(masking, seed, ft, scratch=None):
        return {"kind": "experiment", "masking": masking, "target": "tokens", "mask_ratio": 0.4, "seed": seed,
                "finetune_top1": ft, "scratch_top1": scratch, "linear_probe_pixels": 82.0 + seed / 10}

    rows = [row("block", s, 82.0 + s, 74.0 + s) for s in range(3)] + [row("random", s, 81.0 + s) for s in range(3)]
    fig, ax = plt.subplots()
    rep.seed_panel(ax, by_variant(rows))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0].startswith("block") and labels[1].startswith("random") and labels[2] == "scratch"
    from matplotlib.collections import PathCollection

    dots = sorted(float(y) for c in ax.collections if isinstance(c, PathCollection) for _, y in c.get_offsets())
    assert dots == sorted([82.0, 83.0, 84.0, 81.0, 82.0, 83.0, 74.0, 75.0, 76.0])  # every seed drawn
    lo, hi = ax.get_ylim()
    assert lo <= 74.0 and hi >= 84.0 and hi - lo < 20  # fitted to the data, not 0-100
    assert any("pixels 82.1" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
