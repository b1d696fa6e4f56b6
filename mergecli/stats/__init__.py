"""RegMean's statistics, a library that knows nothing of merging: calibration data, the weightless
model and its layers, the block-by-block engine, hidden-state spill, Gram sums, the statistics store,
collect-stats and combine-stats."""
