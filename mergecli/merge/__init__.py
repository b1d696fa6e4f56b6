"""The streaming merge: tasks (tasks.py), one planner for every method (plan.py), the streaming
loop (stream.py), running a plan (run.py) and the support files of an output (support.py)."""
