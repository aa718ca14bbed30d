"""The ground floor: the HDF5 feature cache file format (layout, writer, reader, content key, verify), the
team store (store, record, transfer, shards, gc, locks) and the user-error base class (errors)."""
