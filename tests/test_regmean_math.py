"""The RegMean closed form against least squares and its limiting cases (pure math, no files)."""

from __future__ import annotations

import pytest
import torch

from mergecli.methods.regmean.math import RegMeanAccumulator, reduce_non_diagonal


def merge(xs: list[torch.Tensor], ws: list[torch.Tensor], model_weights: list[float], ratio: float,
          keep_grams: bool = False):
    """RegMean through the accumulator, from activations X_i `(n_i, d_in)` and weights `[out, in]`.

    With `keep_grams` the output is solved 2 columns at a time, into a float64 `[out, in]` tensor.
    """
    accumulator = RegMeanAccumulator(ratio=ratio, keep_grams=keep_grams)
    for x, w, weight in zip(xs, ws, model_weights):
        accumulator.add(x.T @ x, w.T, weight=weight, tokens=x.shape[0])
    if keep_grams:
        out = torch.empty_like(ws[0])
        result = accumulator.solve(out.T, columns=2)
        assert result.solution.data_ptr() == out.data_ptr()
        return out, result
    result = accumulator.solve()
    return result.solution.T, result


KEEP = pytest.mark.parametrize("keep_grams", [False, True], ids=["summed", "kept-in-column-blocks"])


def random_problem(seed: int, *, d_in: int = 12, d_out: int = 5, tokens=(40, 70, 55)):
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d_in, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, d_in,
                                                                                           dtype=torch.float64)
          for n in tokens]
    ws = [torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) for _ in tokens]
    return xs, ws


def test_reduce_non_diagonal():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    assert torch.equal(reduce_non_diagonal(gram.clone(), 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]],
                                                                             dtype=torch.float64))
    assert torch.equal(reduce_non_diagonal(gram.clone(), 1.0), gram)


@KEEP
@pytest.mark.parametrize("model_weights", [[1.0, 1.0, 1.0], [0.2, 0.5, 0.3]])
def test_ratio_one_is_least_squares_on_stacked_activations(model_weights, keep_grams):
    xs, ws = random_problem(0)
    merged, result = merge(xs, ws, model_weights, ratio=1.0, keep_grams=keep_grams)
    # min_W Σ_i (w_i / n_i) ‖X_i Wᵀ − X_i W_iᵀ‖²: stack the rows scaled by sqrt(w_i / n_i)
    scales = [(w / x.shape[0]) ** 0.5 for x, w in zip(xs, model_weights)]
    a = torch.cat([s * x for s, x in zip(scales, xs)])
    b = torch.cat([s * x @ w.T for s, x, w in zip(scales, xs, ws)])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged, expected, rtol=1e-9, atol=1e-10)
    assert result.dead_features == 0 and result.ridge == 0


@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_identical_grams_give_the_weighted_mean(ratio):
    xs, ws = random_problem(1)
    same = [xs[0]] * 3
    merged, _ = merge(same, ws, [0.5, 0.25, 0.25], ratio=ratio)
    torch.testing.assert_close(merged, 0.5 * ws[0] + 0.25 * ws[1] + 0.25 * ws[2], rtol=1e-9, atol=1e-10)


@KEEP
def test_ratio_zero_is_per_input_feature_weighted_mean(keep_grams):
    xs, ws = random_problem(2)
    model_weights = [0.6, 0.3, 0.1]
    merged, _ = merge(xs, ws, model_weights, ratio=0.0, keep_grams=keep_grams)
    # diag(G_i)_j = w_i · mean over tokens of x_j²: each input column j is a weighted mean
    importance = [w * (x**2).mean(0) for x, w in zip(xs, model_weights)]  # (d_in,) each
    expected = sum(imp * w for imp, w in zip(importance, ws)) / sum(importance)
    torch.testing.assert_close(merged, expected, rtol=1e-9, atol=1e-10)


@KEEP
def test_feature_that_never_fires_gets_the_weighted_mean_and_no_nan(keep_grams):
    xs, ws = random_problem(3)
    for x in xs:
        x[:, 4] = 0.0  # input feature 4 is never active in any model
    model_weights = [1.0, 2.0, 1.0]
    merged, result = merge(xs, ws, model_weights, ratio=1.0, keep_grams=keep_grams)
    assert torch.isfinite(merged).all()
    assert result.dead_features == 1
    total = sum(model_weights)
    mean = sum(w * m for w, m in zip(model_weights, ws)) / total
    torch.testing.assert_close(merged[:, 4], mean[:, 4], rtol=1e-9, atol=1e-10)
    # the other columns are the least-squares fit on the live features
    live = [j for j in range(xs[0].shape[1]) if j != 4]
    scales = [(w / x.shape[0]) ** 0.5 for x, w in zip(xs, model_weights)]
    a = torch.cat([s * x[:, live] for s, x in zip(scales, xs)])
    b = torch.cat([s * x @ w.T for s, x, w in zip(scales, xs, ws)])
    torch.testing.assert_close(merged[:, live], torch.linalg.lstsq(a, b).solution.T, rtol=1e-8, atol=1e-9)


@KEEP
def test_rank_deficient_system_is_regularized_not_nan(keep_grams):
    xs, ws = random_problem(4, tokens=(30, 30))
    for x in xs:
        x[:, 7] = x[:, 2]  # two identical features: Σ G is singular but no diagonal is zero
    merged, result = merge(xs, ws, [1.0, 1.0], ratio=1.0, keep_grams=keep_grams)
    assert torch.isfinite(merged).all()
    assert result.ridge > 0
    # still a least-squares solution: its residual is the minimum one
    a = torch.cat(xs) / 30**0.5
    b = torch.cat([x @ w.T for x, w in zip(xs, ws)]) / 30**0.5
    best = torch.linalg.lstsq(a, b, driver="gelsd").solution
    assert torch.linalg.norm(a @ merged.T - b) <= torch.linalg.norm(a @ best - b) * (1 + 1e-6)
    # the direction the data cannot see (feature 2 minus feature 7) keeps the models' mean, up to
    # the rounding noise of the data in that direction, amplified by 1 / ridge
    unseen = torch.zeros(xs[0].shape[1], dtype=torch.float64)
    unseen[2], unseen[7] = 1.0, -1.0
    mean = (ws[0] + ws[1]) @ unseen / 2
    assert torch.linalg.norm(merged @ unseen - mean) < 1e-3 * torch.linalg.norm(mean)


def test_negative_model_weight_solves_the_indefinite_system():
    xs, ws = random_problem(5, tokens=(60, 60))
    merged, result = merge(xs, ws, [1.5, -0.5], ratio=1.0)
    grams = [w * x.T @ x / x.shape[0] for x, w in zip(xs, [1.5, -0.5])]
    expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, ws))).T
    torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-9)
    assert result.ridge == 0


def test_float32_inputs_are_solved_in_float64():
    xs, ws = random_problem(6)
    accumulator = RegMeanAccumulator(ratio=0.9)
    for x, w in zip(xs, ws):
        accumulator.add((x.T @ x).float(), w.T.to(torch.bfloat16), tokens=x.shape[0])
    assert accumulator.solve().solution.dtype == torch.float64
