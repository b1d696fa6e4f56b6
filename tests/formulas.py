"""The merge methods' formulas in float64, on whole tensors, written here from the papers and from mergekit's
and FusionBench's definitions, sharing no code with mergecli: the references the method tests compare with.
Each takes the base's tensor (or None) and the models' tensors (float64) of one tensor name, and returns the
merged tensor (float64). Where a method draws at random, the draws are mergecli's (`draws`: a hash of the
seed and the position), which the reference takes as given."""

from __future__ import annotations

import math

import torch

from mergecli.methods.dare import draws, stream_key


def ranks_by_magnitude(values: torch.Tensor) -> torch.Tensor:
    """Each entry's 0-based rank by |value| (float32, as mergecli computes task vectors) in a flat tensor,
    ascending, equal ones by position: a stable sort."""
    order = torch.sort(values.reshape(-1).float().abs(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks.view(values.shape)


def top_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |values| (float32), equal ones by position."""
    flat = values.reshape(-1).float().abs()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(-flat, stable=True).indices[:k]] = True
    return mask.view(values.shape)


def elect(vectors: list[torch.Tensor], weights: list[float], *, normalize: bool,
          sign_from: list[torch.Tensor] | None = None) -> torch.Tensor:
    """TIES' disjoint merge of weighted vectors: the sign of Σ (≥ 0: +) of `sign_from` (default: the
    weighted vectors); the agreeing entries summed, divided by their weights' sum when `normalize`."""
    weighted = [v * w for v, w in zip(vectors, weights)]
    sign = torch.where(sum(sign_from or weighted) >= 0, 1.0, -1.0).double()
    agree = [torch.sign(v) == sign for v in (sign_from or weighted)]
    total = sum(torch.where(a, v, 0.0) for a, v in zip(agree, weighted))
    if not normalize:
        return total
    divisor = sum(a.double() * w for a, w in zip(agree, weights))
    return total / torch.where(divisor == 0, 1.0, divisor)


def gta(base, models, weights, sparse, *, elect_signs: bool, normalize: bool, lam: float = 1.0):
    """mergekit's generalized task arithmetic: sparsified task vectors, weighted, elected or summed."""
    vectors = [sparse(i, m - base) for i, m in enumerate(models)]
    if elect_signs:
        return base + lam * elect(vectors, weights, normalize=normalize)
    total = sum(v * w for v, w in zip(vectors, weights))
    divisor = math.fsum(weights) if normalize else 1.0
    return base + lam * total / divisor


def l1_rescaled(vector: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = vector * mask
    before, after = float(vector.abs().sum()), float(kept.abs().sum())
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def dare_mask(seed: int, model: int, name: str, shape, density: float) -> torch.Tensor:
    drawn = torch.from_numpy(draws(stream_key(seed, model, name), 0, math.prod(shape)).astype("float64"))
    return (drawn < density * 2.0**32).view(shape)


def della_mask(vector: torch.Tensor, seed: int, model: int, name: str, density: float, epsilon: float):
    """DELLA's keep mask of one task vector: the rank of each |δ| in its row (dimension 1; a 1-D tensor is one
    row) sets its probability, the draw decides."""
    rows = vector.reshape(1, -1) if vector.dim() == 1 else vector  # 2-D here
    n = rows.shape[1]
    ranks = torch.stack([ranks_by_magnitude(row) for row in rows]).double()
    probability = (density - epsilon) + 2 * epsilon * (ranks / (n - 1) if n > 1 else ranks * 0)
    drawn = torch.from_numpy(draws(stream_key(seed, model, name), 0, vector.numel()).astype("float64"))
    return (drawn.view(rows.shape) < probability * 2.0**32).view(vector.shape)


def breadcrumbs_mask(vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The band of magnitudes kept, counted from the top: equal magnitudes ordered by position, the earlier
    one counting as the larger (as a top-k cut keeps the first ones)."""
    n = vector.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    from_top = torch.empty(n, dtype=torch.long)
    from_top[torch.sort(-vector.reshape(-1).float().abs(), stable=True).indices] = torch.arange(n)
    ranks = (n - 1 - from_top).view(vector.shape)  # ascending
    return (ranks >= bottom) & (ranks < bottom + target)


def model_stock(base, models, filter_wise: bool = False):
    k = len(models)
    shape = base.shape
    if filter_wise and base.dim() > 1:
        rows = [(m - base).reshape(-1, shape[-1]) for m in models]
        dim = -1
    else:
        rows = [(m - base).reshape(1, -1) for m in models]
        dim = -1
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            product = (rows[i].norm(dim=dim) * rows[j].norm(dim=dim)).clamp(min=1e-6)
            cosines.append(((rows[i] * rows[j]).sum(dim) / product).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (k - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, k * cos / torch.where(denominator.abs() < 1e-6, 1.0, denominator))
    mean = sum(rows) / k
    return (base.reshape(mean.shape) + t.unsqueeze(-1) * mean).reshape(shape)


def nearswap(base, model, t: float):
    weight = (t / (model - base).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * model + (1 - weight) * base


def ram(base, models, epsilon: float = 1e-5, r: float | None = None, alpha: float = 0.2):
    vectors = [m - base for m in models]
    marks = [(v.float().abs() > epsilon) for v in vectors]
    count = sum(m.double() for m in marks)
    masked = [v * m for v, m in zip(vectors, marks)]
    if r is None:
        return base + sum(masked) / count.clamp(min=1)
    scales = []
    for mark in marks:
        shared, own = float((mark & (count > 1)).sum()), float((mark & (count == 1)).sum())
        scales.append(1 + r * min(max(shared / max(own, epsilon), 0.0), alpha))
    unique = sum(v * s for v, s in zip(masked, scales))
    return base + torch.where(count == 1, unique, sum(masked) / count.clamp(min=1))


def sce(base, models, select_topk: float = 1.0):
    vectors = [m - base for m in models]
    if select_topk < 1:
        var = torch.var(torch.stack([v.float() for v in vectors]), dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        mask = top_mask(var, k)
        vectors = [v * mask for v in vectors]
    energy = [float(v.square().mean()) for v in vectors]
    total = math.fsum(energy)
    weights = [1 / len(vectors)] * len(vectors) if abs(total) < 1e-6 else [e / total for e in energy]
    sign = torch.where(sum(vectors) >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(v) == sign).double() * w for v, w in zip(vectors, weights)]
    return base + sum(a * v for a, v in zip(agree, vectors)) / sum(agree).clamp(min=1e-6)


def karcher(points, max_iter: int = 10, tol: float = 1e-5):
    """mergekit's Karcher mean, on the whole flat vectors, in float64."""
    alphas = [1 / len(points)] * len(points)
    norms = [float(p.norm()) for p in points]
    units = [p / n if n > 0 else torch.zeros_like(p) for p, n in zip(points, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return points[0] * 0
    weights = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i].reshape(-1) for i in valid]
    mean = sum(w * u for w, u in zip(weights, us))
    mean = us[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, us):
            dot = float(torch.clamp(mean @ u, -1, 1))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += w * (theta / math.sin(theta)) * (u - dot * mean)
        size = float(tangent.norm())
        if size < tol:
            break
        mean = math.cos(size) * mean + math.sin(size) * tangent / size
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).view(points[0].shape)


def slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor):
    """nuslerp's interpolation of two sets of vectors along the last dimension."""
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.where(colinear, 1.0,
                                                                                          torch.sin(theta))
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


def nuslerp(base, models, weights, *, flatten: bool = True, row_wise: bool = False):
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    a, b = ((m - base) if base is not None else m for m in models)
    shape = a.shape
    if flatten or a.dim() == 1:
        merged = slerp_pair(t, a.reshape(-1), b.reshape(-1)).view(shape)
    elif row_wise:
        merged = slerp_pair(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        merged = slerp_pair(t, a, b)
    return merged + (base if base is not None else 0)


def multislerp(base, models, weights, *, normalize_weights: bool = True, eps: float = 1e-8):
    vectors = torch.stack([(m - base) if base is not None else m for m in models]).reshape(len(models), -1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    if float(mean.norm()) < eps:
        merged = (vectors * w.view(-1, 1)).sum(0)  # 0 where no model changes the tensor
    else:
        mean = mean / mean.norm()
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
        size = tangent.norm() + eps
        merged = (mean * torch.cos(size) + tangent * torch.sin(size) / size) * (norms.squeeze(-1) * w).sum()
    return merged.view(models[0].shape) + (base if base is not None else 0)


def arcee_fusion(base, model, dtype=torch.float32):
    """mergekit's Arcee Fusion with exact quantiles; the importance computed in `dtype`, as mergecli does
    (the mask is a comparison: its rounding decides the entries at the threshold)."""
    b, m = base.to(dtype), model.to(dtype)
    rows = (-1, b.shape[-1]) if b.dim() > 1 else (1, -1)
    p = torch.softmax(m.reshape(rows), -1) + 1e-8
    q = torch.softmax(b.reshape(rows), -1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True).clamp(min=0)  # ≥ 0 exactly; rounding aside
    importance = ((m.reshape(rows) - b.reshape(rows)).abs() * kl).reshape(-1)
    ordered = torch.sort(importance).values
    n = ordered.numel()
    q1, median, q3 = (ordered[math.floor(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    keep = (importance >= median + 1.5 * (q3 - q1)).view(base.shape)
    return base + (model - base) * keep


def mean_task_vector(base, models, scale: float = 1.0):
    return base + scale * sum(m - base for m in models) / len(models)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv(base, models, alpha: float = 1.0):
    if base.dim() != 2:
        return mean_task_vector(base, models, alpha)
    us, ss, vs = [], [], []
    for model in models:
        u, s, vh = torch.linalg.svd(model - base, full_matrices=False)
        r = s.numel() // len(models)
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vh[:r])
    merged = polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 0))
    return base + alpha * merged


def iso_c(base, models, scaling_factor: float = 1.0):
    if base.dim() != 2:
        return mean_task_vector(base, models, scaling_factor)
    u, s, vh = torch.linalg.svd(sum(m - base for m in models), full_matrices=False)
    return base + scaling_factor * s.mean() * (u @ vh)


def iso_cts(base, models, scaling_factor: float = 1.0, fraction: float = 0.8):
    if base.dim() != 2:
        return mean_task_vector(base, models, scaling_factor)
    vectors = [m - base for m in models]
    size = min(base.shape)
    common = size - round((size - int(size * fraction)) / len(models)) * len(models)
    each = int((size - common) / len(models))
    u, s, vh = torch.linalg.svd(sum(vectors), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], vh[:common]
    us, ss, vs = [], [], []
    for vector in vectors:
        u_i, s_i, vh_i = torch.linalg.svd(vector - cu @ cu.T @ vector, full_matrices=False)
        us.append(u_i[:, :each]), ss.append(s_i[:each]), vs.append(vh_i[:each])
    spectrum = torch.cat([*ss, cs])
    merged = polar(torch.cat([*us, cu], 1)) * spectrum.mean() @ polar(torch.cat([*vs, cv], 0))
    return base + scaling_factor * merged


def wudi_loss(merged: torch.Tensor, vectors: list[torch.Tensor]) -> float:
    """Σ_i ‖(τ − τ_i) τ_iᵀ‖² / ‖τ_i‖², the loss FusionBench's WUDI minimizes."""
    return sum(float(((merged - v) @ v.T).square().sum() / v.square().sum()) for v in vectors)


def wudi(base, models):
    """WUDI's minimizer by least squares on the stacked normal equations (a solver of its own: lstsq)."""
    if base.dim() != 2:
        return mean_task_vector(base, models)
    vectors = [m - base for m in models]
    # the loss is Σ_i ‖(τ − τ_i) A_i‖² with A_i = τ_iᵀ / ‖τ_i‖: least squares in τ on the stacked A_i
    a = torch.cat([v.T / v.norm() for v in vectors], dim=1)  # in × (K out)
    b = torch.cat([v @ v.T / v.norm() for v in vectors], dim=1)  # out × (K out)
    merged = torch.linalg.lstsq(a.T, b.T, driver="gelsd").solution.T
    return base + merged
