"""Render a report for people (report.md, the terminal) and write the three output files."""

from __future__ import annotations

from pathlib import Path

import yaml

from subspace_cli.report.json_safe import dumps as strict_dumps
from subspace_cli.report.schema import Report


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def to_markdown(report: Report) -> str:
    lines = [f"# subspace {report.verb}: {report.method} on {report.model}", ""]
    lines += [f"subspace {report.tool_version}, report schema {report.schema_version}", ""]
    if report.params:
        p = report.params
        lines += ["## Parameters", "", "| scope | before | after | removed |", "|---|---:|---:|---:|",
                  f"| targeted layers | {p.targeted_before:,} | {p.targeted_after:,} | {p.targeted_ratio_removed:.2%} |",
                  f"| whole model | {p.model_before:,} | {p.model_after:,} | {p.model_ratio_removed:.2%} |", ""]
    if report.perplexity:
        lines += ["## Held-out perplexity", "", "| data | before | after | ratio | tokens |", "|---|---:|---:|---:|---:|"]
        for name, ppl in report.perplexity.items():
            lines.append(f"| {name} | {_fmt(ppl.before)} | {_fmt(ppl.after)} | {_fmt(ppl.ratio)} | {ppl.n_tokens} |")
        lines.append("")
    if report.training:
        lines += _training_section(report)
    if report.healing:
        lines += _healing_section(report.healing)
    if report.tasks:
        lines += _tasks_section(report.tasks)
    if report.samples:
        lines += _samples_section(report.samples)
    if report.merge:
        lines += _merge_section(report.merge)
    if report.unlearn:
        lines += _unlearn_section(report.unlearn)
    lines += ["## Time and memory", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.timings_s.items()]
    lines += ["", f"Peak RSS: {report.peak_rss_mb:.0f} MiB" + (
        f"; peak device memory: {report.peak_device_mb:.0f} MiB" if report.peak_device_mb is not None else ""), ""]
    if report.bench:
        lines += _bench_section(report.bench)
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if any(m.tokens is not None for m in report.matrices):
        lines += _experts_section(report)
    if report.matrices:
        lines += _matrix_table(report)
    if report.method_options:
        lines += ["## Method options", "", "```yaml", yaml.safe_dump(report.method_options, sort_keys=False).rstrip(),
                  "```", ""]
    lines += ["## Options", "", "```yaml", yaml.safe_dump(report.config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _bench_section(bench: dict) -> list[str]:
    lines = ["## Inference speed", "", f"{bench['device']}, {bench['dtype']}, {bench['threads']} threads, prompt "
             f"{bench['prompt_len']} tokens, {bench['decode_tokens']} decode tokens, best of {bench['rounds']} "
             "interleaved rounds (`subspace bench`).", "",
             "| model | weights MiB | prefill ms | decode ms/token | prefill × | decode × | memory-bound ceiling × |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in bench["models"]:
        lines.append(f"| {row['model']} | {row['weight_bytes'] / 2**20:,.1f} | {row['prefill_ms']:.1f} | "
                     f"{row['decode_ms_per_token']:.2f} | {row['prefill_speedup']:.2f} | {row['decode_speedup']:.2f} | "
                     f"{row['decode_ceiling']:.2f} |")
    return lines + [""]


def _training_section(report: Report) -> list[str]:
    t = report.training
    lines = ["## Training", "",
             f"{t.steps} steps, {t.tokens:,} tokens, peak lr {t.lr:g}, {t.seconds:.1f} s; data {t.data_format}, "
             f"{t.train_rows} training / {t.eval_rows} held-out rows"
             + (f"; resumed from step {t.resumed_from}" if t.resumed_from else ""), "",
             f"Trainable parameters: {t.trainable_params:,} of {t.total_params:,} "
             f"({t.trainable_params / max(t.total_params, 1):.3%}).", ""]
    if t.evals:
        lines += ["| step | held-out loss | perplexity |", "|---:|---:|---:|"]
        lines += [f"| {int(e['step'])} | {e['loss']:.4f} | {e['ppl']:.2f} |" for e in t.evals] + [""]
    if report.adapters:
        ranks = sorted({a.export_rank for a in report.adapters})
        lines += [f"{len(report.adapters)} adapted layers, exported as LoRA of rank {', '.join(map(str, ranks))}; "
                  f"the curve is in training_curve.png.", ""]
    return lines


def _healing_section(h) -> list[str]:
    lines = ["## Healing", "",
             f"{h.steps} steps of {h.loss} toward {h.teacher}, {h.tokens:,} tokens ({h.rows} rows of {h.seqlen} from "
             f"{', '.join(h.data)}), peak lr {h.lr:g}, {h.seconds:.1f} s"
             + (f"; resumed from step {h.resumed_from}" if h.resumed_from else "") + ".", "",
             f"Parameter elements (nn.Parameter; a dictionary's packed positions are buffers): {h.params_before:,} "
             f"before healing, {h.params_after:,} after; {h.trainable_params:,} trained"
             + (f"; atom positions of {h.dictionary_patterns_kept} dictionary layers unchanged"
                if h.dictionary_patterns_kept else "") + ".", "",
             "| data | dense | compressed | healed | healed / dense |", "|---|---:|---:|---:|---:|"]
    for name, p in h.perplexity.items():
        lines.append(f"| {name} | {_fmt(p['dense'])} | {_fmt(p['compressed'])} | {_fmt(p['healed'])} | "
                     f"{_fmt(p['healed'] / p['dense'])} |")
    lines.append("")
    if h.evals:
        lines += ["| step | held-out loss | perplexity |", "|---:|---:|---:|"]
        lines += [f"| {int(e['step'])} | {e['loss']:.4f} | {e['ppl']:.2f} |" for e in h.evals] + [""]
    return lines


def _tasks_section(tasks: dict) -> list[str]:
    labels = list(dict.fromkeys(label for rows in tasks.values() for row in rows.values() for label in row["acc"]))
    lines = ["## Task accuracy", "", "| data | task | examples | chance | " + " | ".join(labels) + " |",
             "|---|---|---:|---:|" + "---:|" * len(labels)]
    for source, rows in tasks.items():
        for task, row in rows.items():
            cells = " | ".join(_fmt(row["acc"].get(label), 3) for label in labels)
            lines.append(f"| {source} | {task} | {row['n']} | {_fmt(row['chance'], 3)} | {cells} |")
    return lines + [""]


def _samples_section(samples: list[dict]) -> list[str]:
    lines = ["## Greedy samples", ""]
    for sample in samples:
        lines += [f"Prompt: `{sample['prompt']}`", "", "| model | continuation |", "|---|---|"]
        for label, text in sample["outputs"].items():
            one_line = " ⏎ ".join(text.strip().splitlines()).replace("|", "\\|")
            lines.append(f"| {label} | {one_line} |")
        lines.append("")
    return lines


def _unlearn_section(u) -> list[str]:
    lines = ["## Unlearning", "", f"Steered / reference layer: {u.layer}. Membership-inference AUC (forget rows "
             f"against held-out forget rows, 0.5 = indistinguishable): {_fmt(u.mia_auc_before)} before, "
             f"{_fmt(u.mia_auc_after)} after.", ""]
    for key, value in u.diagnostics.items():
        if key != "layer":
            lines.append(f"- {key}: {value}")
    lines += ["", f"{len(u.changed)} tensors changed ({u.unchanged} bitwise unchanged); targeted: {len(u.targeted)}.", "",
              "| tensor | relative change |", "|---|---:|"]
    lines += [f"| {c.name} | {c.rel_change:.3e} |" for c in u.changed]
    if u.losses:
        last = u.losses[-1]
        lines += ["", "Final step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items())]
    return lines + [""]


def _merge_section(merge) -> list[str]:
    lines = ["## Inputs", "", "| model | weight | density |", "|---|---:|---:|"]
    lines += [f"| {m} | {w:g} | {d:g} |" for m, w, d in zip(merge.models, merge.weights, merge.densities)]
    lines += ["", f"Base: {merge.base or '–'}", ""]
    if merge.perplexity:
        labels = list(next(iter(merge.perplexity.values())))
        lines += ["## Held-out perplexity per task", "", "| task | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for task, row in merge.perplexity.items():
            lines.append(f"| {task} | " + " | ".join(_fmt(row.get(label)) for label in labels) + " |")
        if merge.normalised:
            lines.append("| mean perplexity / specialist's | "
                         + " | ".join(_fmt(merge.normalised.get(label)) for label in labels) + " |")
            lines += ["", "Specialists: " + ", ".join(f"{task}: {m}" for task, m in merge.specialists.items())]
        lines.append("")
    if merge.tensors:
        masked = any(t.mask_density is not None for t in merge.tensors)
        lines += ["## Tensors", "", "| tensor | shape | sparsity of merged task vector | sign conflicts |"
                  + (" mask density |" if masked else ""), "|---|---|---:|---:|" + ("---:|" if masked else "")]
        for t in merge.tensors:
            row = f"| {t.name} | {'×'.join(map(str, t.shape))} | {t.sparsity:.4f} | {t.sign_conflict:.4f} |"
            lines.append(row + (f" {_fmt(t.mask_density)} |" if masked else ""))
        lines.append("")
    return lines


def _experts_section(report: Report) -> list[str]:
    """Per experts module: each expert's calibration tokens, its matrices' ranks and which Gram fitted them."""
    layers: dict[str, dict[int, dict]] = {}
    for m in report.matrices:
        if m.tokens is None:
            continue
        path, matrix, expert = m.name.rsplit(".", 2)  # model.layers.0.mlp.experts . gate_up_proj . 3
        row = layers.setdefault(path, {}).setdefault(int(expert), {"tokens": m.tokens, "ranks": {}, "grams": {}})
        row["ranks"][matrix] = _shape_cell(m)
        row["grams"][matrix] = m.gram or "–"
    matrices = sorted({k for experts in layers.values() for row in experts.values() for k in row["ranks"]})
    lines = ["## Experts", "", "Calibration tokens the router sent to each expert, each matrix's rank and the Gram "
             "that fitted it (pooled: all the layer's tokens, for an expert with fewer tokens than the matrix has "
             "inputs, or with -O expert_grams=pooled).", ""]
    for path, experts in layers.items():
        lines += [f"**{path}**", "", "| expert | tokens | " + " | ".join(matrices) + " | Gram |",
                  "|---:|---:|" + "---:|" * len(matrices) + "---|"]
        for e, row in sorted(experts.items()):
            kinds = {row["grams"].get(k, "–") for k in matrices}
            grams = kinds.pop() if len(kinds) == 1 else ", ".join(f"{k}: {row['grams'].get(k, '–')}" for k in matrices)
            lines.append(f"| {e} | {row['tokens']:,} | " + " | ".join(row["ranks"].get(k, "–") for k in matrices)
                         + f" | {grams} |")
        lines.append("")
    return lines


def _shape_cell(m) -> str:
    if m.kind == "dictionary":
        return f"k={m.atoms}, s={m.nonzeros}" + (" (shared)" if m.dictionary_of else "")
    return "dense" if m.rank is None else str(m.rank)


def _matrix_table(report: Report) -> list[str]:
    with_reference = any(m.reference_rel_error is not None for m in report.matrices)
    head = "| matrix | shape | rank / size | params before | after | whitened rel. error |"
    rule = "|---|---|---:|---:|---:|---:|"
    if with_reference:
        head, rule = head + " svd-llm at equal storage |", rule + "---:|"
    lines = ["## Matrices", "", head + " energy kept |", rule + "---:|"]
    for m in report.matrices:
        reference = f" {_fmt(m.reference_rel_error)} |" if with_reference else ""
        lines.append(f"| {m.name} | {m.shape[0]}×{m.shape[1]} | {_shape_cell(m)} | {m.params_before:,} | "
                     f"{m.params_after:,} | {m.whitened_rel_error:.4f} |{reference} {m.energy_kept:.4f} |")
    if with_reference:
        compared = [m for m in report.matrices if m.reference_rel_error is not None]
        wins = sum(m.whitened_rel_error <= m.reference_rel_error for m in compared)
        lines += ["", f"Whitened error at or below svd-llm's at equal storage on {wins} of {len(compared)} matrices."]
    return lines + [""]


def write_outputs(directory: Path, report: Report, recipe: dict) -> None:
    """report.json, report.md and recipe.yaml (re-runnable with `subspace run`; the verbs pass it with
    absolute paths, pipelines/config_paths.stored_recipe)."""
    (directory / "report.json").write_text(strict_dumps(report.model_dump(mode="json"), indent=2) + "\n")
    (directory / "report.md").write_text(to_markdown(report))
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def print_report(report: Report) -> None:
    """A compact terminal view (stdout): totals and perplexity, not the per-matrix table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]subspace {report.verb}[/]: {report.method} on {report.model} -> {report.output.get('path')}")
    if report.params:
        p = report.params
        console.print(f"targeted params {p.targeted_before:,} -> {p.targeted_after:,} ({p.targeted_ratio_removed:.1%} removed); "
                      f"whole model {p.model_before:,} -> {p.model_after:,} ({p.model_ratio_removed:.1%} removed)")
    if report.training:
        t = report.training
        console.print(f"trained {t.steps} steps ({t.tokens:,} tokens) of {t.trainable_params:,} parameters "
                      f"({t.trainable_params / max(t.total_params, 1):.3%} of the model)")
    if report.healing:
        h = report.healing
        console.print(f"healed {h.steps} steps ({h.loss}, {h.tokens:,} tokens) of {h.trainable_params:,} parameters; "
                      f"model {h.params_before:,} -> {h.params_after:,} parameters")
        for name, p in h.perplexity.items():
            console.print(f"  {name}: dense {_fmt(p['dense'])}, compressed {_fmt(p['compressed'])}, healed "
                          f"{_fmt(p['healed'])}")
    if report.perplexity:
        table = Table(title="held-out perplexity")
        for col in ("data", "before", "after", "ratio", "tokens"):
            table.add_column(col, justify="left" if col == "data" else "right")
        for name, ppl in report.perplexity.items():
            table.add_row(name, _fmt(ppl.before), _fmt(ppl.after), _fmt(ppl.ratio), str(ppl.n_tokens))
        console.print(table)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items())
    console.print(f"time: {stages}; peak RSS {report.peak_rss_mb:.0f} MiB")
    for note in report.notes:
        console.print(f"note: {note}")


def print_eval(result: dict) -> None:
    """`subspace eval`'s summary: a metric table, then each gate."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['data']} ({result['split']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ppl", "nll", "baseline_ppl", "ppl_ratio", "kl", "embedding_similarity", "n_tokens", "n_windows"):
        if key in result:
            value = result[key]
            table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.6g}")
    for name, task in result.get("tasks", {}).items():
        for key in ("acc", "baseline_acc", "acc_ratio"):
            if key in task:
                table.add_row(f"{name}.{key}", f"{task[key]:.4g}")
        table.add_row(f"{name}.n", f"{task['n']:,} (chance {task['chance']:.2g})")
    console = Console()
    console.print(table)
    if result.get("note"):
        console.print(result["note"])
    for gate in result.get("gates", []):
        status = "[red]FAIL[/red]" if gate["failed"] else "[green]pass[/green]"
        console.print(f"{status}  fail-if {gate['condition']}  ({gate['field']} = {gate['value']:.6g})")


def print_inspect(result: dict) -> None:
    """`subspace inspect`'s summary: one row per matrix, then the totals."""
    from rich.console import Console
    from rich.table import Table

    whitened = result["calibration"] is not None
    table = Table(title=f"{result['model']} ({result['architecture']})", title_justify="left")
    for col in ("block", "matrix", "shape", "erank", "r90", "r99", "even"):
        table.add_column(col, justify="left" if col == "matrix" else "right")
    if whitened:
        for col in ("w-erank", "w-r90", "w-r99"):
            table.add_column(col, justify="right")
    for row in result["matrices"]:
        cells = [str(row["block"]), row["kind"], "×".join(map(str, row["shape"])), f"{row['effective_rank']:.1f}",
                 str(row["rank_90"]), str(row["rank_99"]), str(row["break_even_rank"])]
        if whitened:
            cells += [f"{row.get('whitened_effective_rank', float('nan')):.1f}",
                      str(row.get("whitened_rank_90", "-")), str(row.get("whitened_rank_99", "-"))]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    console.print("erank: effective rank; r90 / r99: rank keeping 90% / 99% of the energy; even: break-even rank"
                  + ("; w-: on the whitened spectrum (W·L)" if whitened else ""))
    summary = result["summary"]
    console.print(
        f"{summary['n_matrices']} matrices, {summary['params']:,} parameters; "
        f"keeping 90% / 99% of each matrix's energy would keep "
        f"{summary['params_fraction_at_90']:.1%} / {summary['params_fraction_at_99']:.1%} of them"
    )
    if whitened and "whitened_params_fraction_at_90" in summary:
        console.print(
            f"whitened on {result['calibration']['data']}: "
            f"{summary['whitened_params_fraction_at_90']:.1%} / {summary['whitened_params_fraction_at_99']:.1%}"
        )
    if result.get("plot"):
        console.print(f"plot: {result['plot']}")


def print_bench(result: dict) -> None:
    """`subspace bench`'s summary: one row per model, ratios against the first."""
    from rich.console import Console
    from rich.table import Table

    batches = sorted(result["models"][0]["tokens_per_s"], key=int)
    table = Table(title=f"subspace bench on {result['device']} ({result['dtype']}, {result['threads']} threads, "
                        f"prompt {result['prompt_len']}, {result['decode_tokens']} decode tokens, best of "
                        f"{result['rounds']})", title_justify="left")
    for col in ("model", "weights MB", "cache MB", "prefill ms", "decode ms/token", *(f"tok/s b{b}" for b in batches),
                "prefill ×", "decode ×", "ceiling ×"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in result["models"]:
        table.add_row(row["model"], f"{row['weight_bytes'] / 2**20:,.1f}", f"{row.get('cache_bytes', 0) / 2**20:,.1f}",
                      f"{row['prefill_ms']:.1f}",
                      f"{row['decode_ms_per_token']:.2f}", *(f"{row['tokens_per_s'][b]:.1f}" for b in batches),
                      f"{row['prefill_speedup']:.2f}", f"{row['decode_speedup']:.2f}", f"{row['decode_ceiling']:.2f}")
    console = Console()
    console.print(table)
    console.print(result["note"])
