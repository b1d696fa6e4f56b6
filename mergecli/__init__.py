"""mergecli: merge model checkpoints from the shell, streaming tensor by tensor.

The public API mirrors the commands:

    >>> from mergecli import load_recipe, plan_merge, run_merge
    >>> recipe = load_recipe("recipes/demo-average.toml")
    >>> report = run_merge(plan_merge(recipe, force=True))
"""

__version__ = "0.2.0"

_EXPORTS = {
    "load_recipe": "mergecli.merge.configs",
    "plan_merge": "mergecli.merge.plan",
    "run_merge": "mergecli.merge.run",
    "plan_stats": "mergecli.stats.collect",
    "collect_all": "mergecli.stats.collect",
    "StatsSession": "mergecli.stats.collect",
    "push": "mergecli.publish.push",
    "Method": "mergecli.methods.base",
    "register": "mergecli.methods.base",
    "method_of": "mergecli.methods.registry",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import the public functions lazily: `import mergecli` stays cheap (no torch import)."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergecli' has no attribute {name!r}")
