"""A toy third merge method, in one file: every tensor the average would make is taken from the
first model instead. Importing this module registers it as `method = "first"`."""

from __future__ import annotations

from mergecli.methods.base import Method, TensorTask, copy_first, register


class TakeFirst(Method):
    name = "first"
    title = "copy of the first model"
    help = "every tensor that would be averaged taken from the first model"
    mergekit = "take_first"
    command = "average"
    kinds = {"first": "taken from the first model"}

    def tasks(self, recipe, inputs, tasks, warnings):
        first = inputs.models[0]
        return [TensorTask(t.out, "first", (first,), copy_first) if t.kind == "average" else t for t in tasks]

    def describe(self, recipe):
        return ["**Take the first model**: every tensor that would be averaged is the first model's.", ""]


register(TakeFirst())
