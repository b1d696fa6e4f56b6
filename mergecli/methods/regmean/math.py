"""RegMean (Jin et al., ICLR 2023): the closed-form merge of linear layers. Pure math, no files.

For models i = 1..n with weights W_i (in the `[out, in]` orientation of `nn.Linear`) and input
Gram matrices G_i (`[in, in]`), the merged weight minimizes Σ_i ‖X_i W_Mᵀ − X_i W_iᵀ‖² after the
non-diagonal part of each G_i is scaled by α:

    W_Mᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ          G̃_i = α·G_i + (1−α)·diag(G_i)

Everything is computed in float64 and solved (Cholesky, else LU), never inverted. Σ G̃ is
factored once; the right-hand sides can then be solved a block of output columns at a time, so
that a wide layer (an LM head with a large vocabulary) never needs its whole float64 Σ G̃ Wᵀ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergecli.stats.grams import never_fired

RIDGES = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)  # relative to the (unit) diagonal


@dataclass(frozen=True)
class SolveResult:
    """The merged weight `[in, out]` (i.e. W_Mᵀ), and what had to be done to get it."""

    solution: torch.Tensor
    dead_features: int = 0  # input features that no model's data activated: weighted mean used
    ridge: float = 0.0  # relative ridge added because the system stayed singular; inf: unsolvable


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """α·G + (1−α)·diag(G), in place: off-diagonal entries are scaled by α, the diagonal is kept.

    Args:
        gram: `(d_in, d_in)` Gram matrix (modified and returned).
        ratio: α = `reduce_non_diagonal_ratio`, in [0, 1].
    """
    if ratio == 1.0:
        return gram
    diagonal = gram.diagonal().clone()
    gram.mul_(ratio)
    gram.diagonal().copy_(diagonal)
    return gram


def dead_features(gram: torch.Tensor) -> torch.Tensor:
    """Indices of input features whose Gram diagonal is (numerically) zero: never activated."""
    return never_fired(gram.diagonal())


class Factor:
    """A factorization of Σ G̃, ready to solve right-hand sides a block of columns at a time.

    Input features that never fired (zero diagonal in Σ G̃) leave their row of the solution
    undetermined by the data; those rows are taken from the fallback (the weighted mean of the
    W_iᵀ). The system is scaled to a unit diagonal; if it is still (numerically) singular, e.g.
    when LayerNorm-centred inputs span fewer dimensions than they have, a ridge of growing size
    (`RIDGES`) pulls the undetermined directions towards the fallback:
    (Σ G̃ + λD) X = Σ G̃ Wᵀ + λD·fallback, with D the diagonal of Σ G̃. If nothing solves, the
    solution is the fallback.

    Args:
        gram_sum: Σ G̃_i, `(d_in, d_in)`, float64; modified in place.
        psd: Σ G̃ is positive semi-definite (no negative model weight): Cholesky, else LU.
    """

    def __init__(self, gram_sum: torch.Tensor, *, psd: bool = True):
        a = gram_sum.to(torch.float64)
        self.dead = dead_features(a)
        if self.dead.numel():
            # A dead feature's row and column are zero (G is PSD): its equation becomes X[j] = fallback[j].
            a[self.dead, :] = 0.0
            a[:, self.dead] = 0.0
            a[self.dead, self.dead] = 1.0
        # Jacobi scaling: a unit diagonal makes the singularity test and the ridge scale-free.
        self.scale = a.diagonal().abs().clamp_min(torch.finfo(torch.float64).tiny).rsqrt()  # (d_in,)
        a.mul_(self.scale[:, None]).mul_(self.scale[None, :])
        factorize = _cholesky if psd else _lu
        self.ridge = 0.0
        self.solver: Callable[[torch.Tensor], torch.Tensor] | None = factorize(a)
        if self.solver is None:
            identity = torch.eye(len(a), dtype=torch.float64)
            for ridge in RIDGES:
                self.solver = factorize(a + ridge * identity)
                if self.solver is not None:
                    self.ridge = ridge
                    break
        if self.solver is None:
            self.ridge = float("inf")
        self.failed = self.solver is None

    def solve(self, rhs: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """X `(d_in, k)` float64 for right-hand sides Σ G̃ Wᵀ `(d_in, k)` (modified in place) and the
        matching columns of the fallback."""
        fallback = fallback.to(torch.float64)
        if self.solver is None:
            return fallback.clone()
        b = rhs.to(torch.float64)
        if self.dead.numel():
            b[self.dead] = fallback[self.dead]
        b.mul_(self.scale[:, None])
        if self.ridge:
            b.add_(fallback / self.scale[:, None], alpha=self.ridge)
        x = self.solver(b).mul_(self.scale[:, None])
        if not bool(torch.isfinite(x).all()):
            self.failed = True
            return fallback.clone()
        return x


def _singular(pivots: torch.Tensor) -> bool:
    """Pivots of a factorization of a unit-diagonal matrix: singular to working precision?"""
    smallest = float(pivots.abs().min()) if pivots.numel() else 1.0
    return smallest <= len(pivots) * torch.finfo(torch.float64).eps


def _cholesky(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or _singular(factor.diagonal() ** 2):
        return None
    return lambda b: torch.cholesky_solve(b, factor)


def _lu(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    lu, pivots, info = torch.linalg.lu_factor_ex(a)
    if int(info) != 0 or _singular(lu.diagonal()):
        return None
    return lambda b: torch.linalg.lu_solve(lu, pivots, b)


class RegMeanAccumulator:
    """RegMean of one layer, fed one model at a time.

    Two ways to hold the models, chosen by `keep_grams`:

    - False (tall or square layers, solved whole): Σ G̃_i and Σ G̃_i W_iᵀ are summed as models
      come, so that only one model's Gram is held besides the two sums;
    - True: each G̃_i is kept, Σ G̃ is factored once, and the solution is formed a block of output
      columns at a time, by `solve` (from the W_iᵀ given to `add`) or by `solve_block` (from W_iᵀ
      columns given later: a weight streamed in row blocks), so that no float64 copy of a whole
      weight is ever made.

    Example:
        >>> acc = RegMeanAccumulator(ratio=0.9)
        >>> for gram, weight_t, w, n in zip(grams, weights_t, model_weights, token_counts):
        ...     acc.add(gram, weight_t, weight=w, tokens=n)
        >>> merged_t = acc.solve().solution
    """

    def __init__(self, *, ratio: float, keep_grams: bool = False):
        self.ratio = ratio
        self.keep_grams = keep_grams
        self.gram_sum: torch.Tensor | None = None  # (d_in, d_in)
        self.rhs: torch.Tensor | None = None  # (d_in, d_out), when not keep_grams
        self.weighted_sum: torch.Tensor | None = None  # (d_in, d_out): Σ w_i W_iᵀ, for the fallback
        self.kept: list[tuple[torch.Tensor, float]] = []  # (G̃_i, w_i), when keep_grams
        self.weights_t: list[torch.Tensor] = []  # W_iᵀ given to `add`, when keep_grams
        self.weight_sum = 0.0
        self.negative = False
        self._factor: Factor | None = None

    def add(self, gram: torch.Tensor, weight_t: torch.Tensor | None = None, *, weight: float = 1.0,
            tokens: int = 1) -> None:
        """Add one model.

        Args:
            gram: Σ xᵀx over the model's `tokens` calibration tokens, `(d_in, d_in)`; a float64
                `gram` is scaled in place (consumed), so that no second copy is held.
            weight_t: W_iᵀ, `(d_in, d_out)` (the transposed `nn.Linear` weight, or a Conv1D weight),
                any floating dtype; may be left out with `keep_grams`, for `solve_block`.
            weight: the model's weight; G_i = weight · gram / tokens, so that each model counts
                by its weight whatever its number of tokens.
        """
        g = gram.to(torch.float64)
        g.mul_(weight / tokens)
        reduce_non_diagonal(g, self.ratio)
        if self.gram_sum is None:
            self.gram_sum = g.clone() if self.keep_grams else g
        else:
            self.gram_sum.add_(g)
        if self.keep_grams:
            self.kept.append((g, weight))
            if weight_t is not None:
                self.weights_t.append(weight_t)
        else:
            if weight_t is None:
                raise ValueError("weight_t is needed unless keep_grams")
            w = weight_t.to(torch.float64)
            if self.rhs is None or self.weighted_sum is None:
                self.rhs, self.weighted_sum = g @ w, w * weight
            else:
                self.rhs.addmm_(g, w)
                self.weighted_sum.add_(w, alpha=weight)
        self.weight_sum += weight
        self.negative |= weight < 0

    @property
    def factor(self) -> Factor:
        """Σ G̃, factored (once, after the last `add`)."""
        if self._factor is None:
            if self.gram_sum is None:
                raise ValueError("no model added")
            self._factor = Factor(self.gram_sum, psd=not self.negative)
            self.gram_sum = None  # factored: no longer needed
        return self._factor

    def result(self, solution: torch.Tensor) -> SolveResult:
        factor = self.factor
        return SolveResult(solution, int(factor.dead.numel()), float("inf") if factor.failed else factor.ridge)

    def solve_block(self, weights_t: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """W_Mᵀ columns `(d_in, k)` for the same columns of each model's W_iᵀ (in `add` order);
        float64, or written into `out`. Only with `keep_grams`."""
        if not self.keep_grams:
            raise ValueError("solve_block needs keep_grams")
        norm = self.weight_sum or 1.0
        rhs = fallback = None
        for (g, weight), weight_t in zip(self.kept, weights_t, strict=True):
            w = weight_t.to(torch.float64)  # (d_in, k)
            if rhs is None or fallback is None:
                rhs, fallback = g @ w, w * (weight / norm)
            else:
                rhs.addmm_(g, w)
                fallback.add_(w, alpha=weight / norm)
        assert rhs is not None and fallback is not None
        solution = self.factor.solve(rhs, fallback)
        return out.copy_(solution) if out is not None else solution

    def solve(self, out: torch.Tensor | None = None, *, columns: int | None = None) -> SolveResult:
        """W_Mᵀ `(d_in, d_out)`: float64, or written into `out` (any dtype, may be a transposed view).

        Args:
            columns: output columns solved at a time when `keep_grams` (default: d_in, so that a
                block takes about as much memory as one Gram matrix).
        """
        if not self.keep_grams:
            if self.rhs is None or self.weighted_sum is None:
                raise ValueError("no model added")
            solution = self.factor.solve(self.rhs, self.weighted_sum.div_(self.weight_sum or 1.0))
            self.rhs = self.weighted_sum = None
            return self.result(out.copy_(solution) if out is not None else solution)
        d_in, d_out = self.weights_t[0].shape
        solution = out if out is not None else torch.empty((d_in, d_out), dtype=torch.float64)
        step = columns or max(1, d_in)
        for start in range(0, d_out, step):
            stop = min(d_out, start + step)
            self.solve_block([w[:, start:stop] for w in self.weights_t], solution[:, start:stop])
        self.kept.clear()
        self.weights_t.clear()
        return self.result(solution)
