"""Optional compute kernels for compressed modules.

Nothing here is needed to load or run a checkpoint: the modules in
`subspace_cli.modules.remote_modeling` always have a plain torch path. Triton, when installed,
is imported lazily by the kernels that use it.
"""
