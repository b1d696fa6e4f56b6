"""mergecli: merge model checkpoints from the shell, streaming tensor by tensor."""

__version__ = "0.1.0"
