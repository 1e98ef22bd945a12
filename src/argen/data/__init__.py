"""Data: datasets, transforms, the bundled demo set, code shards and text features."""
