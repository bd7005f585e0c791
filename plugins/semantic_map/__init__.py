"""The ``semantic_map`` condition: a per-pixel class map, one-hot, concatenated to the latent."""
