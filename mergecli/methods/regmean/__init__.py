"""RegMean and RegMean++: the closed-form math (math.py), the method (method.py), the streamed solve of
one linear weight (solve.py), its tasks from collected statistics (tasks.py), and RegMean++'s
block-by-block stages (plusplus.py)."""
