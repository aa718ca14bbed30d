"""The HDF5 feature cache: layout, reader, and the team store (store, verify, transfer, shards, gc)."""
