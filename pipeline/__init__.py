"""Data plane: sources, shards, views, masking, token store, the MIM and labelled datasets. Never imports `model`."""
