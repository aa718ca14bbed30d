"""Image dataset adapters; each returns an ImageDataset."""
