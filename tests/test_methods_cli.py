"""`subspace methods [NAME]`: the catalogue lists every registered method; one method shows each
option with its default and meaning; an unknown name exits 2."""

import json

from cli_runner import run_cli
from subspace_cli.methods.catalog import methods_for


def cli(*args):
    return run_cli(*args, env={"COLUMNS": "160"})  # wide enough that an option and its meaning share a row


def test_catalogue_lists_every_method_with_paper_and_needs():
    proc = cli("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {(m["verb"], m["name"]): m for m in json.loads(proc.stdout)["methods"]}
    registered = {(verb, name) for verb in ("compress", "adapt", "merge", "unlearn") for name in methods_for(verb)}
    assert set(listed) == registered
    assert all(m["paper"] for m in listed.values())
    assert listed[("merge", "ties")]["needs"] == ["base"]
    assert listed[("unlearn", "sspu")]["options"]["relevant"]["default"] == 128


def test_one_method_shows_each_option_default_and_meaning():
    proc = cli("methods", "sspu")
    assert proc.returncode == 0, proc.stderr
    fields = methods_for("unlearn")["sspu"].config_class.model_fields
    for key, field in fields.items():
        assert key in proc.stdout, key
    assert "arXiv 2505.24428" in proc.stdout and "forget data, retain data" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("│ relevant "))
    assert "128" in row and "relevant subspace" in row


def test_unknown_method_exits_2():
    proc = cli("methods", "no-such-method")
    assert proc.returncode == 2
    assert "unknown method 'no-such-method'" in proc.stderr
