"""The linear probe as what it is, a convex problem: multinomial logistic regression with an
L2 penalty, solved to convergence by full-batch L-BFGS on cached features.

Why not the AdamW probe (stages/probe.py: train_linear, `probe.solver: adamw`): on the micro
encoder's 128-d features it stops far from the optimum. Seed 0 of the default, train holdout,
block 6: AdamW 100 epochs 73.4%, 300 epochs 75.4%; L-BFGS on standardised features 76.4% after
500 iterations and 78.1% after 1,500, still moving. Mean-pooled ViT features are strongly
correlated, so per-feature standardisation leaves the problem ill-conditioned; on PCA-whitened
features L-BFGS converges in 100-260 iterations (78.7% at l2 1e-4). Raw pixels gain less (82-83%
-> ~84%), so the old probe understated the learned features more than the floor.

Whitening is one of the settings the holdout chooses, not always on: on 2,352 raw pixels with
6,000 images (many near-constant border pixels) it would inflate noise directions, and in
whitened coordinates the same l2 is a different penalty. Full batch keeps the fit a pure,
deterministic function of (features, labels, setting): no sampling order, no seed.

Bit-identical columns are fitted once (`distinct_columns`). The pixel floor of a grey dataset sees
each pixel three times (the grey image replicated to RGB, normalised alike), and its fits were 90%
of the `linear-probe` stage: the default's 10 holdout fits on 2,352 pixels took ~8 of the stage's
~9 min on a 2-core AVX2 EPYC, memory-bound, with 2/3 of the bytes repeats. k identical columns
z with weights w_1..w_k enter the logits as (sum w_i) z and the penalty as sum w_i^2, which for
a given sum is least when the w_i are equal: the problem is exactly the one over a single column
sqrt(k) z with weight v = sqrt(k) w_i, and in whitened coordinates the same (the covariance of
the full set is that of the scaled distinct columns, rotated, plus null directions that carry only
rounding noise). So the optimum, and in exact arithmetic every L-BFGS iterate, is unchanged;
learned features have no repeated columns and give the same bits as before.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# Eigenvalues below this share of the largest are floored there before whitening: directions the
# fit set barely spans (constant border pixels, a collapsed feature) must not be blown up.
EIGEN_FLOOR = 1e-5


def distinct_columns(x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """x [N, D] -> (the first column of each group of bit-identical columns [D'], in order,
    or None where all D are distinct; each group's size float64 [D'])."""
    first: dict[bytes, int] = {}
    count: list[int] = []
    columns: list[int] = []
    # exact bytes as dict keys: equal columns, never merely equal hashes
    for j, col in enumerate(x.T.contiguous().numpy()):  # [D] rows of [N]
        g = first.setdefault(col.tobytes(), len(columns))
        if g == len(columns):
            columns.append(j)
            count.append(0)
        count[g] += 1
    counts = torch.tensor(count, dtype=torch.float64)  # [D']
    return (None if len(columns) == x.shape[1] else torch.tensor(columns)), counts


@dataclasses.dataclass(frozen=True)
class InputMap:
    """z = (x[:, columns] - mean) @ transform: the probe's input, standardised or whitened (and
    each kept column scaled by sqrt of its copies: see the module doc). A function of the fit
    features alone, so one map serves every l2 tried on them (`prepare`)."""

    mean: torch.Tensor  # [D']
    transform: torch.Tensor  # [D', r] (whitening; r = D' unless fewer images than columns) or [D'] (per feature)
    columns: Optional[torch.Tensor] = None  # [D'] the distinct columns of x read; None: all D

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            x = x[:, self.columns]  # [N, D] -> [N, D']
        z = (x.double() - self.mean)  # [N, D']
        return z @ self.transform if self.transform.dim() == 2 else z * self.transform  # [N, D']


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """logits = inputs(x) @ weight + bias."""

    inputs: InputMap
    weight: torch.Tensor  # [D', K]
    bias: torch.Tensor  # [K]
    iterations: int

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: features already mapped by `inputs` [N, D'] -> logits [N, K]."""
        return (z @ self.weight + self.bias).float()  # [N, K]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.inputs(x))  # [N, D] -> [N, K]


def prepare(x: torch.Tensor, whiten: bool) -> InputMap:
    """The input map fit on features x [N, D]. On a 6,272-column token grid its eigendecomposition
    and the whitened copy of x are most of a fit, so the stage prepares once per feature set and
    solves every l2 on the same z."""
    columns, copies = distinct_columns(x)
    kept = (x if columns is None else x[:, columns]).double()  # [N, D']
    mean = kept.mean(0)  # [D']
    root = copies.sqrt()  # [D'] all ones where no column repeats (x * 1.0 is x, bit for bit)
    n, d = kept.shape
    if whiten and n <= d:
        # Fewer images than columns (a token grid: 6,000 x 6,272 for the default, 40 x 8,192 in
        # the tests): the covariance has rank < N, and its nonzero spectrum is the N x N Gram
        # matrix's (c = U S V^T: c c^T = U S^2 U^T, V = c^T U / S). Directions under the floor are
        # dropped, not floored: past rank N-1 they are rounding noise, and no fit image has any
        # component along them to learn a weight from.
        c = (kept - mean) * root  # [N, D']
        # numpy's LAPACK (OpenBLAS dsyevd), not torch's (MKL): the same float64 decomposition up to
        # rounding, in 20.7 s instead of 31-36 s for the default's 6,000 x 6,000 Gram on a 2-core AMD
        # EPYC, x6 blocks a probe (bench/eigh.py prints the ratio). Rounding already differs between
        # thread counts (MKL at 1 and 2 threads: eigenvectors 7e-5 apart), so no bits were stable here.
        # numpy computes c c^T by dsyrk (half the flops of torch's gemm: 2.5 s against 4.5 s)
        gram = c.numpy() @ c.numpy().T / (n - 1)  # [N, N]
        eig, u = (torch.from_numpy(a) for a in np.linalg.eigh(gram))  # [N], [N, N]: ascending
        keep = eig >= EIGEN_FLOOR * float(eig[-1].clamp_min(1e-30))
        eig, u = eig[keep], u[:, keep]  # [r], [N, r]
        vec = (c.T @ u) / (eig * (n - 1)).sqrt()  # [D', r] orthonormal eigenvectors of the covariance
        transform = root[:, None] * (vec / eig.sqrt())  # [D', r]: scale, then whiten
    elif whiten:  # whiten the distinct columns scaled by sqrt(copies): the full set's spectrum
        eig, vec = torch.linalg.eigh(torch.cov(((kept - mean) * root).T))  # [D'], [D', D']: ascending, orthonormal
        floor = EIGEN_FLOOR * float(eig[-1].clamp_min(1e-30))
        transform = root[:, None] * (vec / eig.clamp_min(floor).sqrt())  # [D', D']: scale, then whiten
    else:
        transform = root / kept.std(0).clamp_min(1e-6)  # [D']
    return InputMap(mean, transform, columns)


def objective(z: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of z @ w + b + l2 / 2 * ||w||^2, its gradient in w [D', K], in b [K]) for
    z [N, D'], its transpose zt [D', N] (contiguous), labels y [N].

    The same float64 ops as autograd on that expression, in the order its backward runs (log-softmax
    backward, then w's three gradient terms summed as its input buffer does), so every bit is the
    same (tests/test_probe.py): the fits keep their iterates, choices and metrics. Why by hand:
    autograd reads z transposed for the w gradient (z^T g with z row-major), which MKL's gemm runs at
    half speed on these tall-skinny shapes; the stored zt gives the same sums (the kernel's reduction
    order is the same) at 1.3-2x the closure's speed (6,000 x 1,332: 30.6 -> 15.7 ms)."""
    n, classes = len(y), w.shape[1]
    logits = z @ w + b  # [N, K]
    logp = F.log_softmax(logits, 1)  # [N, K]
    loss = F.nll_loss(logp, y) + 0.5 * l2 * (w * w).sum()  # = F.cross_entropy(logits, y) + penalty
    dloss = torch.zeros(n, classes, dtype=logp.dtype)  # [N, K]: nll_loss's mean-reduction gradient
    dloss[torch.arange(n), y] = -1.0 / n
    g = torch.ops.aten._log_softmax_backward_data(dloss, logp, 1, logp.dtype)  # [N, K] d loss / d logits
    half = w * (0.5 * l2)  # [D', K]: each factor of w * w gets grad (0.5 l2) * the other
    return loss, (half + half) + zt @ g, g.sum(0)


def solve(inputs: InputMap, z: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
          max_iter: int) -> LinearProbe:
    """The probe on z = inputs(x) [N, D'], labels y [N], minimising mean cross-entropy
    + l2 / 2 * ||W||^2 (bias unpenalised), in float64, from zero weights."""
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64)  # [D', K]
    b = torch.zeros(classes, dtype=torch.float64)  # [K]
    zt = z.T.contiguous()  # [D', N]: see `objective`
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    @torch.no_grad()
    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = objective(z, zt, y, w, b, l2)
        return loss

    opt.step(closure)
    return LinearProbe(inputs, w, b, int(opt.state[w]["n_iter"]))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, whiten: bool,
                 max_iter: int) -> LinearProbe:
    """Features x [N, D], labels y [N] -> the penalised logistic regression (`solve`) on the
    standardised or whitened features (`prepare`)."""
    inputs = prepare(x, whiten)
    return solve(inputs, inputs(x), y, classes, l2, max_iter)
