"""Reading and writing model files: the safetensors format, checkpoints (local or from the hub),
output shards and atomic output directories."""
