"""The linear probe's L-BFGS objective: autograd's closure against `stages/convex_probe.py: objective`.

    .venv/bin/python bench/probe_closure.py [--n 6000] [--dims 128 784 1332] [--repeats 3]

Every L-BFGS iteration of the probe evaluates the loss and its gradient at least once, on z
[N, D'] float64: the mean-pooled features (D' = 128), the pixel floor's distinct pixels (784)
and a whitened token grid (~1,300 kept directions), 6,000 fit images. Autograd computes the
w gradient as z^T g from the row-major z, a transposed read; `objective` computes the same ops
from a stored contiguous z^T. This prints, per shape, both closures' time side by side
(alternated, medians), their ratio, whether loss and gradients are the same bits, and one whole
`solve` (500 L-BFGS iterations at most) each way, with whether the weights are the same bits.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_probe import autograd_objective, autograd_solve  # noqa: E402  (the old closure)
from stages.convex_probe import InputMap, objective, solve  # noqa: E402


def problem(n: int, d: int, classes: int = 10, seed: int = 0):
    """Standardised-looking features with a decaying spectrum and labels a linear map explains in part."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(1.0, 0.05, d, dtype=torch.float64)
    y = (z[:, :classes] + 2.0 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)  # [N]
    return z, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 784, 1332])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--l2", type=float, default=1e-4)  # weakly penalised: hundreds of iterations, as the grid's
    args = ap.parse_args()
    print(f"probe objective, float64, N = {args.n}, 10 classes, {torch.get_num_threads()} threads, "
          f"medians of {args.repeats} alternated rounds")
    autograd_solve(*problem(64, 16), 10, args.l2, 5)  # first-call set-up outside the timings
    for d in args.dims:
        z, y = problem(args.n, d)
        zt = z.T.contiguous()
        g = torch.Generator().manual_seed(1)
        w = torch.randn(d, 10, generator=g, dtype=torch.float64) * 0.01
        b = torch.randn(10, generator=g, dtype=torch.float64) * 0.01
        same = all(torch.equal(p, q) for p, q in zip(autograd_objective(z, y, w, b, args.l2),
                                                      objective(z, zt, y, w, b, args.l2)))
        times: dict[str, list[float]] = {"autograd": [], "objective": []}
        for _ in range(args.repeats):
            for name, fn in (("autograd", lambda: autograd_objective(z, y, w, b, args.l2)),
                             ("objective", lambda: objective(z, zt, y, w, b, args.l2))):
                fn()
                t = time.perf_counter()
                for _ in range(20):
                    fn()
                times[name].append((time.perf_counter() - t) / 20)
        a, o = (statistics.median(times[k]) * 1e3 for k in ("autograd", "objective"))
        t = time.perf_counter()
        w_old, _, it_old = autograd_solve(z, y, 10, args.l2, 500)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = solve(InputMap(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)), z, y, 10,
                    args.l2, 500)
        t_new = time.perf_counter() - t
        print(f"  D' {d:5d}: closure autograd {a:6.2f} ms, objective {o:6.2f} ms: {a / o:.2f}x; same bits: {same}")
        print(f"           solve   autograd {t_old:6.2f} s,  objective {t_new:6.2f} s:  {t_old / t_new:.2f}x; "
              f"iterations {it_old} / {new.iterations}; same weights: {torch.equal(w_old, new.weight)}")


if __name__ == "__main__":
    main()
