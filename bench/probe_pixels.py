"""The pixel floor's L-BFGS fits: this revision's `fit_logistic` beside another revision's.

    dvc repro shard@train shard@test          # the default's shards (under a minute)
    git show REV:stages/convex_probe.py > /tmp/old_convex.py
    .venv/bin/python bench/probe_pixels.py --against /tmp/old_convex.py [--settings 4]

Runs the holdout grid of `beit linear-probe`'s raw-pixel reference (params.yaml's probe.l2s x
probe.whiten, max_iter) with both versions, interleaved setting by setting on the same cached
pixels (fit set: the 10% label subset; holdout: probe.validation train images outside it), and
prints per fit: iterations, seconds, holdout and test top-1. The test column is printed to show that
the numbers agree, never to choose anything. Ratios are of the summed seconds of one run.
"""
from __future__ import annotations

import time

import click
import torch

from against import load_module  # bench/against.py (a script's folder is on sys.path)


@click.command()
@click.option("--against", "against_path", required=True, help="another revision's stages/convex_probe.py")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--settings", default=0, help="only the first N settings of the grid (0: all)")
def main(against_path: str, params_path: str, settings: int) -> None:
    from stages import convex_probe as this
    from stages.config import load_params
    from stages.probe import probe_data

    other = load_module(against_path, "other_convex_probe")
    params = load_params(params_path)
    data = probe_data(params, pixels=True)
    x, y = data.fit[0][0], data.fit[1]  # [N, 3*S*S], [N]
    hx, hy = data.holdout[0][0], data.holdout[1]
    ex, ey = data.eval[0][0], data.eval[1]
    columns, copies = this.distinct_columns(x)
    print(f"pixels: fit {tuple(x.shape)}, holdout {len(hy)}, test {len(ey)}; distinct columns "
          f"{x.shape[1] if columns is None else len(columns)} (copies: {sorted(set(copies.tolist()))}), "
          f"{torch.get_num_threads()} threads")
    grid = [(w, l2) for w in params.probe.whiten for l2 in params.probe.l2s]
    grid = grid[:settings] if settings else grid
    total = {"other": 0.0, "this": 0.0}
    print(f"{'whiten':>6} {'l2':>7} | {'other: iters':>12} {'s':>6} {'holdout':>7} {'test':>6} | "
          f"{'this: iters':>11} {'s':>6} {'holdout':>7} {'test':>6}")
    for whiten, l2 in grid:
        cells = []
        for name, module in (("other", other), ("this", this)):
            t = time.perf_counter()
            probe = module.fit_logistic(x, y, data.classes, l2, whiten, params.probe.max_iter)
            sec = time.perf_counter() - t
            total[name] += sec
            with torch.no_grad():
                h = (probe(hx).argmax(1) == hy).float().mean().item() * 100
                e = (probe(ex).argmax(1) == ey).float().mean().item() * 100
            cells.append(f"{probe.iterations:>12} {sec:6.1f} {h:7.2f} {e:6.2f}")
        print(f"{str(whiten):>6} {l2:7.0e} | " + " | ".join(cells), flush=True)
    print(f"summed: other {total['other']:.1f} s, this {total['this']:.1f} s: "
          f"{total['other'] / total['this']:.2f}x")


if __name__ == "__main__":
    main()
