"""Recipe tuning on the train holdout (issue 11): never the test split.

    .venv/bin/python bench/holdout.py NAME finetune|scratch KEY=VALUE ... [--params params.yaml]

Each run is `beit finetune` / `beit scratch` on params.yaml with `finetune.validation: 5000`
(5,000 train images outside the label subset, disjoint by construction:
`pipeline/classify.py: holdout_subset`), 2,000 of them scored after every epoch for the curve
(`finetune.eval_samples`; the holdout is no test split), and the given dotted overrides, e.g.
`finetune.loop.batch_size=32 finetune.optim.lr=4.0e-3`. Its outputs go under
`runs/holdout/NAME/` (models/ and metrics/ are left alone), and one JSON line with the
settings, the per-epoch holdout top-1, the last train loss, img/s and wall time is appended
to reports/tuning-holdout.jsonl, the record the README's tuning table is read from.
The pretrained checkpoint is the workspace's outputs.pretrain, as in the stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.config import load_params  # noqa: E402
from stages.finetune import train_classifier  # noqa: E402

LEDGER = ROOT / "reports" / "tuning-holdout.jsonl"
VALIDATION = 5000


def override(tree: dict, dotted: str) -> None:
    """KEY.SUB=VALUE in place; VALUE is YAML (so 4.0e-3 is a float, [0.5, 1.0] a list)."""
    key, sep, value = dotted.partition("=")
    if not sep:
        raise SystemExit(f"{dotted!r}: expected KEY=VALUE")
    *path, leaf = key.split(".")
    node = tree
    for part in path:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"{key}: no such section {part!r} in the params")
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"{key}: no such key in the params")
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("kind", choices=("finetune", "scratch"))
    ap.add_argument("over", nargs="*", help="dotted KEY=VALUE overrides")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    tree = yaml.safe_load(Path(args.params).read_text())
    for dotted in [f"finetune.validation={VALIDATION}", "finetune.eval_samples=2000", *args.over]:
        override(tree, dotted)
    out = ROOT / "runs" / "holdout" / args.name
    out.mkdir(parents=True, exist_ok=True)
    record = tree["outputs"][args.kind]
    for field in record:
        record[field] = str(out / Path(record[field]).name)
    path = out / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    t0 = time.perf_counter()
    m = train_classifier(load_params(path), args.kind)
    row = {"name": args.name, "kind": args.kind, "over": args.over, "top1": m["top1"],
           "epoch_top1": m["epoch_top1"], "train_loss": m["train_loss"], "img_per_s": m["img_per_s"],
           "wall_s": round(time.perf_counter() - t0)}
    with LEDGER.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
