"""Pure tensor math of the merge methods: no files, no recipes."""
