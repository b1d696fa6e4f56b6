"""Publishing a finished merge: `push` to the Hugging Face Hub (push.py)."""
