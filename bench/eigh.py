"""The linear probe's Gram eigendecomposition: torch's LAPACK (MKL) against numpy's (OpenBLAS).

    .venv/bin/python bench/eigh.py [--n 6000] [--dim 6272] [--repeats 2]

stages/convex_probe.py: prepare whitens a token grid (6,000 fit images x 6,272 columns in the
default) through the eigendecomposition of its N x N Gram matrix, once per block: 6 a probe. Both
libraries run float64 dsyevd; which is faster depends on the CPU (MKL takes its generic path on
AMD). This prints both, side by side, on a Gram with a grid-like decaying spectrum, their ratio,
and how far the two kept spectra and subspaces are apart.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def gram(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """An N x N float64 Gram of N centred features whose variances decay like a token grid's."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.8  # [dim] ~1,000 directions above the floor, as a grid
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * scale  # [N, dim]
    c = x - x.mean(0)
    return c @ c.T / (n - 1)  # [N, N]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=6272)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    a = gram(args.n, args.dim)
    times: dict[str, list[float]] = {"torch (MKL)": [], "numpy (OpenBLAS)": []}
    for _ in range(args.repeats):  # alternated, so drift on a shared machine hits both
        t = time.perf_counter()
        e_t, u_t = torch.linalg.eigh(a)
        times["torch (MKL)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        e_n, u_n = np.linalg.eigh(a.numpy())
        times["numpy (OpenBLAS)"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"float64 eigh of a {args.n} x {args.n} Gram, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}:")
    for k, v in times.items():
        print(f"  {k:<18} {med[k]:6.1f} s   " + " ".join(f"{x:.1f}" for x in v))
    print(f"  numpy / torch time: {med['numpy (OpenBLAS)'] / med['torch (MKL)']:.2f}")
    keep = e_t >= 1e-5 * e_t[-1]  # the probe's EIGEN_FLOOR
    u_n = torch.from_numpy(u_n)[:, keep.numpy()]
    cosines = torch.linalg.svdvals(u_t[:, keep].T @ u_n)  # principal angles of the kept subspaces
    rel = ((torch.from_numpy(e_n)[keep] - e_t[keep]).abs() / e_t[keep]).max()
    print(f"  kept {int(keep.sum())} directions: eigenvalues agree to {rel:.1e} (relative), "
          f"smallest principal cosine {cosines.min():.15f}")


if __name__ == "__main__":
    main()
