"""Stage 1: datasets, backbones, the streaming feature extractor, its manifest, and --device."""
