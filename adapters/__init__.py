"""Adapters: the manifest, verifying against a base, fetching, applying and merging, continuing training."""
