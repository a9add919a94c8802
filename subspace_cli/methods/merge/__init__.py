"""Merge methods: per-tensor merges (streamed) and the concrete subspace mask (trained on the whole model)."""
