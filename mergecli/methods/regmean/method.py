"""The `regmean` method: RegMean (Jin et al., ICLR 2023) for every linear layer with statistics,
the weighted average for everything else; with `[regmean] sequential = true`, RegMean++.
"""

from __future__ import annotations

from pathlib import Path

from mergecli.errors import RecipeError
from mergecli.io.atomic import clean_directory
from mergecli.methods.base import Inputs, Method, Stage, TensorTask, register
from mergecli.methods.regmean.plusplus import plusplus_stages
from mergecli.methods.regmean.settings import RegMeanSettings
from mergecli.methods.regmean.tasks import EXPERT_AVERAGE, regmean_tasks
from mergecli.recipe import Recipe
from mergecli.stats.device import resolve_device
from mergecli.stats.settings import require_data

REGMEAN_PAPER = "https://arxiv.org/abs/2212.09849"
REGMEAN_PLUSPLUS_PAPER = "https://arxiv.org/abs/2508.03121"


class RegMean(Method):
    name = "regmean"
    title = "RegMean merge"
    help = "linear layers solved in closed form from the Gram matrices of their inputs (RegMean, RegMean++)"
    command = "regmean merge"
    settings = RegMeanSettings
    kinds = {"regmean": "RegMean (linear weights)", "regmean++": "RegMean++ (linear weights)",
             EXPERT_AVERAGE: "averaged (MoE experts with fewer calibration tokens than inputs)"}

    def check(self, recipe: Recipe) -> None:
        require_data(list(enumerate(recipe.models)))
        if recipe.weights_vary:
            raise RecipeError(recipe.source, [recipe.locate("models: a weight that varies by tensor is not read by "
                                                            "RegMean, which weighs each model's Gram matrices once")])

    def tasks(self, recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[TensorTask]:
        return regmean_tasks(recipe, inputs, tasks, warnings)

    def stages(self, recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[Stage]:
        resolve_device(inputs.device)  # a wrong --device is refused before anything runs
        warnings += clean_directory(Path(recipe.settings.stats_dir))  # what killed runs left
        if recipe.settings.sequential:
            return plusplus_stages(recipe, inputs, tasks, warnings)
        return super().stages(recipe, inputs, tasks, warnings)

    def label(self, recipe: Recipe) -> str:
        return "RegMean++ merge" if recipe.settings.sequential else self.title

    def describe(self, recipe: Recipe) -> list[str]:
        settings = recipe.settings
        if settings.sequential:
            lead = [f"**RegMean++** ([Nguyen et al., TMLR 2026]({REGMEAN_PLUSPLUS_PAPER})), RegMean "
                    f"([Jin et al., ICLR 2023]({REGMEAN_PAPER})) block by block: block l's Gram matrices come "
                    "from each model's own block l run on inputs that went through the merged blocks 0..l-1."]
        else:
            lead = [f"**RegMean** ([Jin et al., ICLR 2023]({REGMEAN_PAPER}), \"Dataless Knowledge Fusion by "
                    "Merging Weights of Language Models\")."]
        return [
            lead[0] + " Every linear layer is merged in closed form, "
            "`W = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢ` with `G̃ᵢ = α·Gᵢ + (1−α)·diag(Gᵢ)`, where Gᵢ is the Gram matrix "
            "of the layer's inputs in model i on its calibration data; everything else is averaged "
            "with the weights below.",
            "",
            f"- α (`reduce_non_diagonal_ratio`): {settings.reduce_non_diagonal_ratio:g}",
            f"- calibration: up to {settings.num_examples} examples per model, "
            f"at most {settings.max_length} tokens each",
            "- linear layers solved in float64, everything else accumulated in float32",
        ]


register(RegMean())
