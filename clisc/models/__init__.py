"""Model weights: the catalogue, the local cache, downloads, and loaders of the real architectures."""
