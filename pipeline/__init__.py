"""Data plane: sources, shards, views, masking, token store, loader. Never imports `model`."""
