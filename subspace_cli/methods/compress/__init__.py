"""Compress methods: low-rank transforms (svd, asvd, svd-llm) and sparse-dictionary factorizers (cospadi)."""
