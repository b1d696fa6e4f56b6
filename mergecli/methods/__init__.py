"""Merge methods: the Method interface and registry (base.py), and the pure math of each method."""
