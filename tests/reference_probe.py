"""The probe's L-BFGS fit as it was before `stages/convex_probe.py: objective`: autograd in the
closure. Kept as the reference that tests/test_probe.py compares `objective` and `solve` with, bit
for bit, and that bench/probe_closure.py times side by side."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def autograd_objective(z, y, w, b, l2):
    """(loss, its gradient in w, in b) as autograd computes them, at copies of w [D', K] and b [K]."""
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = F.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
    loss.backward()
    return loss.detach(), w.grad, b.grad


def autograd_solve(z, y, classes: int, l2: float, max_iter: int):
    """(weight [D', K], bias [K], L-BFGS iterations) of the old `solve` on z [N, D'], labels y [N]."""
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), int(opt.state[w]["n_iter"])
