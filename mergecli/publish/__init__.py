"""Publishing a merge: the model card written into every output (card.py), and `push` to the hub (push.py)."""
