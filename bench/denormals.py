"""Does `train-tokenizer` slow down over its run because of subnormal floats?

    .venv/bin/python bench/denormals.py [--params params.yaml] [--steps 250] [--repeats 1]

On a 2-core Intel Xeon (AMX) the default's dVAE steps went from ~0.5 s to ~0.85 s over its
250 steps, while its input pipeline and shapes stay the same. Subnormal (denormal) floats are
slow on Intel cores (each operation that makes or reads one can take a microcode assist);
the Gumbel softmax sharpens as its temperature anneals and the KL weight warms up, so its
probabilities of the unchosen codes underflow toward the subnormal range late in the run.

This trains the stage's dVAE (the same model, schedule, loader and thread count as
`beit train-tokenizer`, the shards under outputs.shards) twice per repeat, with
`torch.set_flush_denormal` off and on, alternating which goes first, and prints the seconds
per step of each quarter of the run, the ratio, and both runs' final loss / mse (flushing
changes results wherever a subnormal occurred, so they are not bit-identical).
Needs `dvc repro shard` first.

Result (2026-12-05, 2-core Intel Xeon with AMX, `--repeats 1`): **not the cause**. Flushing left
the final loss and mse equal to 5 decimals (0.01480 / 0.01425: no subnormal reached the result)
and did not speed anything up (whole run 174.6 s off, 187.5 s on; per quarter 0.64 / 0.65 / 0.80
/ 0.71 s a step off against 0.73 / 0.70 / 0.83 / 0.74 on). The slow third quarter is in both.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.dvae import DVAE  # noqa: E402
from model.dvae_train import train_dvae  # noqa: E402
from stages.config import load_params  # noqa: E402
from stages.train_tokenizer import _train_threads, train_batches  # noqa: E402


def one_run(params, steps: int, flush: bool) -> tuple[list[float], dict]:
    """-> (wall time of every step in s, the last step's stats)."""
    cfg = params.tokenizer
    torch.set_flush_denormal(flush)
    torch.manual_seed(params.seed)
    model = DVAE(cfg.model)
    torch.set_num_threads(_train_threads(cfg.loader.num_workers))
    stamps = [time.perf_counter()]
    last: dict = {}

    def on_step(step: int, stats: dict) -> None:
        stamps.append(time.perf_counter())
        last.update(stats)

    try:
        train_dvae(model, train_batches(params, cfg.model.image_size), steps, cfg.schedule, on_step=on_step)
    finally:
        torch.set_flush_denormal(False)
    return [b - a for a, b in zip(stamps, stamps[1:])], last


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--steps", default=None, type=int, help="dVAE steps per run [default: tokenizer.steps]")
@click.option("--repeats", default=1, show_default=True, help="pairs of runs (off/on, then on/off, ...)")
def main(params_path: str, steps: int | None, repeats: int) -> None:
    params = load_params(params_path)
    steps = steps or params.tokenizer.steps
    if not torch.set_flush_denormal(True):
        click.echo("this CPU cannot flush denormals (no SSE3): nothing to compare")
        return
    torch.set_flush_denormal(False)
    times: dict[bool, list[list[float]]] = {False: [], True: []}
    final: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(repeats):
        for flush in ((False, True) if r % 2 == 0 else (True, False)):
            t, last = one_run(params, steps, flush)
            times[flush].append(t)
            final[flush].append(last)
            click.echo(f"  run {r} flush={flush}: {sum(t):.1f} s, loss {last['loss']:.5f}, mse {last['mse']:.5f}")
    q = steps // 4
    click.echo(f"\ndVAE {params.tokenizer.model}, batch {params.tokenizer.batch_size}, {steps} steps, "
               f"{_train_threads(params.tokenizer.loader.num_workers)} training thread(s); "
               f"median over {repeats} run(s) of s/step per quarter:")
    click.echo("| steps | flush off | flush on | off / on |\n|---|---|---|---|")
    for i in range(4):
        part = slice(i * q, (i + 1) * q if i < 3 else steps)
        off = statistics.median(statistics.mean(t[part]) for t in times[False])
        on = statistics.median(statistics.mean(t[part]) for t in times[True])
        click.echo(f"| {part.start}-{part.stop} | {off:.3f} | {on:.3f} | {off / on:.2f}x |")
    off, on = (statistics.median(sum(t) for t in times[f]) for f in (False, True))
    click.echo(f"| whole run (s) | {off:.1f} | {on:.1f} | {off / on:.2f}x |")
    for f in (False, True):
        click.echo(f"final loss / mse, flush={f}: " + ", ".join(f"{d['loss']:.5f} / {d['mse']:.5f}" for d in final[f]))


if __name__ == "__main__":
    main()
