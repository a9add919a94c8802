"""Unlearn methods for `subspace unlearn`: the shared contract, the methods, and the SSPU building blocks."""
