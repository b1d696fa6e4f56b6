"""RegMean: calibration data, layer discovery, Gram collection and its on-disk store (collect-stats),
and the `regmean` method's tasks (merge)."""
