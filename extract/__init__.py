"""Stage 1: datasets, backbones and the streaming feature extractor."""
