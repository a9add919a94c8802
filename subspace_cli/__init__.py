"""subspace: subspace surgery on Hugging Face checkpoints.

The package import stays light (no torch) so that `subspace --help` is fast; heavy entry
points are imported lazily.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path, **kwargs):
    """Load a checkpoint written by subspace (factored or dense) without remote code.

    See `subspace_cli.modules.loading.load_model`.
    """
    from subspace_cli.modules.loading import load_model as _load

    return _load(path, **kwargs)
