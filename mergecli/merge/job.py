"""A recipe bound to its method, once, before any input is read: the one place where a recipe's keys
become typed settings, cross-key settings are checked, the command is checked against the method, and
`--stream`'s fetcher is started and owned.

    job = prepare(recipe, command="merge", output=out, force=False)  # checked; nothing read yet
    plan = plan_merge(job, output=out)                                # inputs opened, the output planned

With `--stream`, a head start resolves the hub inputs and reads their headers while torch imports
(cheap requests, seconds of latency saved); it fetches no weight byte until the recipe is bound, so a
recipe that is refused costs no transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergecli.errors import RecipeError, UsageError
from mergecli.io.atomic import check_output_path, output_directory
from mergecli.io.head_start import HeadStart
from mergecli.io.remote import Fetcher
from mergecli.merge.slices import check_sources, sub_recipe
from mergecli.methods.base import Method
from mergecli.methods.registry import closest, method_names, method_of
from mergecli.publish.push import check_access
from mergecli.recipe import Recipe


@dataclass
class Job:
    """A recipe, its method with typed settings (once bound), and the fetcher of its streamed inputs."""

    recipe: Recipe
    method: Method | None = None
    head_start: HeadStart | None = None
    slices: list[Recipe] = field(default_factory=list)  # each slice as a recipe of its own, bound
    stages: list[Job] = field(default_factory=list)  # the earlier merges it reads, bound
    _fetcher: Fetcher | None = None

    @property
    def bound(self) -> Method:
        if self.method is None:
            raise RuntimeError("the job is not bound to its method yet")
        return self.method

    def start_streaming(self, output: Path | str | None, *, force: bool) -> None:
        """With `stream = true`: begin resolving the hub inputs and reading their headers, once the output
        is known to be writable (a refusal then costs no transfer); weights wait for `bind`."""
        recipe = self.recipe
        if not recipe.stream or self.head_start is not None:
            return
        precheck(recipe)
        check_output_path(output_directory(output if output is not None else recipe.output), [], force=force)
        self.head_start = HeadStart([(spec.path, spec.revision) for spec in recipe.input_specs],
                                    connections=recipe.stream_connections, buffer=recipe.stream_buffer)

    def bind(self, *, command: str | None = None, push: bool = False) -> Job:
        """Bind the recipe to its method: its keys validated into typed settings, the command checked,
        the method's own checks and the cross-key ones made, and (`push`) the token checked for a
        recipe that pushes; then the head start may fetch weights.

        Raises:
            RecipeError, UsageError: one line per problem; HubAccessError: a push without a token.
        """
        try:
            precheck(self.recipe)
            method = method_of(self.recipe)
            if command is not None and method.command != command and not (command == "merge"
                                                                          and method.command == "average"):
                raise UsageError(f"this recipe's method is {self.recipe.method!r}, which `mergecli {method.command}` "
                                 f"runs", hint=f"run `mergecli {method.command} RECIPE`")
            if self.recipe.slices:
                if method.command != "merge":
                    raise RecipeError(self.recipe.source, [self.recipe.locate(
                        f"slices: {method.name} does not merge slices (any method `mergecli merge` runs does)")])
                self.slices = [sub_recipe(self.recipe, number) for number in range(len(self.recipe.slices))]
                for sub in self.slices:
                    method.check(sub)
            else:
                method.check(self.recipe)
            self.stages = [Job(stage).bind(command="merge") for stage in self.recipe.stages or []]
            if push and self.recipe.push_to_hub:
                check_access(self.recipe.push.repo_id)  # before the merge: a token problem found after it wastes it
        except BaseException:
            self.close()
            raise
        self.method = method
        if self.head_start is not None:
            self.head_start.release()
        return self

    def fetcher(self) -> Fetcher | None:
        """The fetcher of the streamed inputs (the head start's), or None without `--stream`; the plan's
        inputs own it from then on and close it."""
        if self._fetcher is None and self.head_start is not None:
            self._fetcher = self.head_start.fetcher()
        return self._fetcher

    def close(self) -> None:
        """Stop fetching (a job that failed before its inputs were opened)."""
        if self.head_start is not None:
            self.head_start.close()


def precheck(recipe: Recipe) -> None:
    """What needs no method to check: the method exists (by its file, nothing imported), and keys that
    name models name ones the recipe has (slices' sources; its stages' too).

    Raises:
        RecipeError: one line per problem.
    """
    problems = []
    if recipe.method not in method_names():
        close = closest(recipe.method, method_names())
        guess = f"; did you mean {close!r}?" if close else ""
        problems.append(f"method: unknown method {recipe.method!r}{guess} (methods: {', '.join(method_names())})")
    names = [spec.name for spec in recipe.models]
    tokenizer = recipe.tokenizer
    if tokenizer not in ("base", "union", *names) and "/" not in tokenizer and not Path(tokenizer).exists():
        problems.append(f"tokenizer: {tokenizer!r} is not \"base\", \"union\", a model of the recipe "
                        f"({', '.join(names)}) or the path of a model whose tokenizer to use")
    sources = [*names, *(["base"] if recipe.base else [])]
    for token, spec in recipe.tokens.items():
        model = spec.source.get("model") if isinstance(spec.source, dict) else spec.source
        if model is not None and model not in (*sources, "zero"):
            problems.append(f"tokens.{token}.source: {model!r} is not a model of the recipe ({', '.join(sources)}) "
                            "nor \"zero\"")
    if problems:
        raise RecipeError(recipe.source, [recipe.locate(problem) for problem in problems])
    check_sources(recipe)
    for stage in recipe.stages or []:
        precheck(stage)


def prepare(recipe: Recipe, *, command: str | None = None, output: Path | str | None = None, force: bool = False,
            dry_run: bool = False) -> Job:
    """A job for `recipe`, bound and checked; with `stream = true` and a real run, its head start begun."""
    job = Job(recipe)
    if not dry_run:
        job.start_streaming(output, force=force)
    return job.bind(command=command, push=not dry_run)
