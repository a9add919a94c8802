"""The package's layering (pyproject.toml [tool.importlinter], docs/contributing.md): imports point
down, cli -> pipelines -> methods -> modules -> linalg/kernels -> walk/io/report/evaluate, and no
sibling packages or modules import each other. `make test` runs `lint-imports` too; this test makes a
plain `pytest` (and `make test-fast`) hold the same contract."""

import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(ROOT)  # reads pyproject.toml from the working directory
    # import-linter configures logging with dictConfig, which disables every logger that exists: put them back.
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict]
    disabled = {logger: logger.disabled for logger in loggers if isinstance(logger, logging.Logger)}
    try:
        code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    finally:
        for logger, was in disabled.items():
            logger.disabled = was
    assert code == 0, capsys.readouterr().out


def test_kernels_and_io_do_not_reach_up():
    """The two upward imports the layering closed: kernels -> modules, io -> modules."""
    import grimp

    graph = grimp.build_graph("subspace_cli")
    for low, high in (("subspace_cli.kernels", "subspace_cli.modules"), ("subspace_cli.io", "subspace_cli.modules"),
                      ("subspace_cli.walk", "subspace_cli.io"), ("subspace_cli.pipelines", "subspace_cli.cli")):
        chains = graph.find_shortest_chains(importer=low, imported=high, as_packages=True)
        assert not chains, f"{low} imports {high}: {sorted(chains)[:3]}"
