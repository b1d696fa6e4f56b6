"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024), as mergekit 0.1.5 defines it (`magnitude_outliers`):
of each task vector δ_i = θ_i − θ_b of n entries in a tensor, the largest `gamma` share of magnitudes (the
outliers) and the smallest ones are dropped, keeping ⌊density · n⌋: by magnitude from the top, the entries
ranked n − n_bot − ⌊density · n⌋ to n − n_bot, with n_bot = max(0, n − ⌊density · n⌋ − ⌊gamma · n⌋) (so fewer
outliers go where density + gamma > 1). A model whose density is 1 is kept whole. The survivors are
rescaled to the tensor's L1 norm with `rescale = true` (off by default, as in mergekit), weighted, then
summed (`breadcrumbs`) or merged by TIES' sign election (`breadcrumbs_ties`): θ = θ_b + λ × that
(methods/sparse.py).

Both cuts are exact, equal magnitudes ordered by position, and streamed: each is a top-k threshold taken
by passes over the tensor's row blocks (methods/trims.py), both from the same reads.
"""

from __future__ import annotations

import torch

from mergecli.io.buffers import thread_buffer
from mergecli.methods.base import register, shown_value
from mergecli.methods.bracket import sample_share
from mergecli.methods.sparse import SparseMethod
from mergecli.methods.task_vectors import DensitySettings, DensityValue
from mergecli.methods.trims import Population, row_blocks, sample_plan, trim_passes
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying

PAPER = "https://arxiv.org/abs/2312.06795"
GammaValue = Varying(float, ge=0.0, le=1.0, allow_inf_nan=False)


class BreadcrumbsSettings(DensitySettings):
    """`[breadcrumbs]` / `[breadcrumbs_ties]`: density (the share kept), gamma (the share of largest magnitudes
    dropped), lambda, and rescale (keep each tensor's L1 norm)."""

    density: DensityValue | dict[str, DensityValue] = 1.0
    gamma: GammaValue | dict[str, GammaValue] = 0.01
    rescale: bool = False


class ModelBreadcrumbs(StrictModel):
    """A [[models]] entry's own density and gamma."""

    density: DensityValue | None = None
    gamma: GammaValue | None = None


def band(size: int, density: float, gamma: float) -> tuple[int, int]:
    """(k_high, k_low): the band kept is the k_high largest magnitudes but the k_low largest."""
    target, top = int(density * size), int(gamma * size)
    bottom = max(0, size - target - top)
    return size - bottom, size - bottom - target


class Breadcrumbs(SparseMethod):
    settings = BreadcrumbsSettings
    model_settings = ModelBreadcrumbs
    normalize_default = False
    paper = f"[Davari & Belilovsky, ECCV 2024]({PAPER})"
    dropped = ("of each task vector δᵢ = θᵢ − θ_base, the largest gamma share of magnitudes and the smallest are "
               "dropped, ⌊density · n⌋ kept")

    def sparsifier(self, recipe, inputs, task, read, here, shared):
        size = task.out.numel
        share = sample_share(size)
        sample = sample_plan(task, share)
        cuts = []  # per model read: (its k_high cut, its k_low cut or None), or None when kept whole
        for index, _, _ in read:
            density, gamma = here.models[index].density, here.models[index].gamma
            if density >= 1.0:
                cuts.append(None)
                continue
            high, low = band(size, density, gamma)
            cuts.append((Population(size, 1.0, 1, sample, k=high),
                         Population(size, 1.0, 1, sample, k=low) if low > 0 else None))
        if all(cut is None for cut in cuts):
            return None, ()
        populations = [(population, 0, i) for i, cut in enumerate(cuts) if cut is not None
                       for population in cut if population is not None]

        def sparsify(vectors: list[torch.Tensor], start: int, remember: bool = False) -> None:
            for i, (cut, vector) in enumerate(zip(cuts, vectors)):
                if cut is None:
                    continue
                high, low = cut
                if low is None:
                    high.trim.trim_(vector, start)
                    continue
                outliers = thread_buffer(("outliers", i), vector.numel(), vector.dtype).copy_(vector)
                high.trim.trim_(vector, start)
                low.trim.trim_(outliers, start)
                vector.sub_(outliers)  # the k_low largest are in both: x − x = 0 exactly

        block = task.out.elements(row_blocks(task)[0])
        return sparsify, trim_passes(populations, share, block, label="breadcrumbs cuts")

    def setting_lines(self, recipe) -> list[str]:
        gamma = recipe.settings.gamma
        shown = ", ".join(f"{k} {shown_value(v)}" for k, v in gamma.items()) if isinstance(gamma, dict) else \
            shown_value(gamma)
        return [f"- gamma (largest magnitudes dropped): {shown}",
                "- both cuts exact, equal magnitudes ordered by position"]


class BreadcrumbsLinear(Breadcrumbs):
    name = "breadcrumbs"
    title = "Model Breadcrumbs merge"
    help = "task vectors without their largest and smallest magnitudes, then summed"
    mergekit = "breadcrumbs"
    kinds = {"breadcrumbs": "breadcrumbs"}


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    title = "Model Breadcrumbs TIES merge"
    help = "task vectors without their largest and smallest magnitudes, then TIES' signs"
    mergekit = "breadcrumbs_ties"
    elect_signs = True
    kinds = {"breadcrumbs_ties": "breadcrumbs TIES"}


register(BreadcrumbsLinear())
register(BreadcrumbsTies())
