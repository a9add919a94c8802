"""Optional compute kernels for compressed modules, as `torch.library` ops (`subspace::...`).

Nothing here is needed to load or run a checkpoint: the modules in
`subspace_cli.modules.remote_modeling` always have a plain torch path, and this package never
imports them (a module opts in through duck typing). Triton, when installed, is imported by the
kernel modules that use it, which register their ops at import.
"""
