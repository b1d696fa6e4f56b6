"""The streaming merge: the default tasks (tasks.py), one planner for every method (plan.py), the
streaming loop (stream.py), running a plan (run.py), and what an output holds beside its weights
(support.py, and the model card, card.py)."""
