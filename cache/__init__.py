"""The HDF5 feature cache: reading (and, later, the content-addressed store)."""
