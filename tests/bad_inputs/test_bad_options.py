"""Bad options, per verb: unknown method, bad -O key / value / missing '=', numbers out of range
or not numbers, bad shard sizes, devices that do not exist here (no GPU), bad dtypes, sequence
lengths past the model's positions, bad regexes, unknown flags, missing required arguments.
Parser-level errors (click) must look like every other error: one `error:` line, exit 2, and a
JSON error object with --json."""

from __future__ import annotations

import pytest

from bad_input_harness import MISSING, Case, params, run_case, std
from tiny_models import TEXT

pytestmark = pytest.mark.slow  # the bad-input sweep (hundreds of CLI runs) is the slow tier


def opt(verb: str, id_: str, *extra: str, expected=2, **kw) -> Case:
    """A valid tiny invocation of `verb` plus `extra` flags."""
    return Case(verb, id_, lambda ctx: std(ctx, verb, extra=list(extra), **kw), expected_exit=expected)


def long_text(verb: str, id_: str, *extra: str) -> Case:
    """With 120k characters of data, so that the held-out 5% is longer than the model's 256 positions."""
    return Case(verb, id_, lambda ctx: std(ctx, verb, data=ctx.text("long.txt", TEXT * 15), extra=list(extra)))


# Options every verb with a model shares (--device, --dtype, unknown flags).
def _common(verb: str) -> list[Case]:
    cases = [
        opt(verb, "device-cuda", "--device", "cuda"),
        opt(verb, "device-cuda-index", "--device", "cuda:3"),
        opt(verb, "device-bogus", "--device", "bogus"),
        opt(verb, "device-empty", "--device", ""),
        opt(verb, "device-cpu-index-bogus", "--device", "cpu:x"),
        opt(verb, "dtype-int8", "--dtype", "int8"),
        opt(verb, "dtype-bogus", "--dtype", "float33"),
        opt(verb, "unknown-flag", "--frobnicate"),
        opt(verb, "unknown-flag-with-value", "--frobnicate=3"),
        opt(verb, "extra-positional", "surplus-argument"),
        opt(verb, "allow-pickle-with-value", "--allow-pickle=maybe"),
        Case(verb, "model-argument-missing", lambda ctx: std(ctx, verb, model=MISSING)),
    ]
    if verb == "merge":  # merge's positional takes any number of models: a surplus one is a missing path
        cases = [c for c in cases if c.id not in ("extra-positional", "model-argument-missing")]
    if verb in ("compress", "adapt", "merge", "unlearn"):
        cases.append(Case(verb, "out-missing", lambda ctx: std(ctx, verb, out=MISSING)))
        # (no --json run: `--out --json` would make "--json" the output directory, as click reads it)
        cases.append(Case(verb, "out-flag-without-value", lambda ctx: std(ctx, verb, out=MISSING) + ["--out"],
                          json=False))
        cases += [opt(verb, "shard-size-5", "--shard-size", "5"), opt(verb, "shard-size-abc", "--shard-size", "abc"),
                  opt(verb, "shard-size-0", "--shard-size", "0"), opt(verb, "shard-size-negative", "--shard-size", "-1GB"),
                  opt(verb, "shard-size-5-bytes-unit", "--shard-size", "5B")]
    if verb in ("compress", "adapt", "unlearn", "inspect"):
        cases.append(opt(verb, "seed-not-int", "--seed", "x"))
    return cases


COMPRESS = [
    opt("compress", "method-unknown", "--method", "frobnicate"),
    opt("compress", "method-of-other-verb", "--method", "lora"),
    opt("compress", "option-unknown-key", "-O", "bogus=1"),
    opt("compress", "option-bad-value", "-O", "shrinkage=abc"),
    opt("compress", "option-out-of-range", "-O", "shrinkage=7"),
    opt("compress", "option-without-equals", "-O", "shrinkage"),
    opt("compress", "option-empty-key", "-O", "=0.1"),
    opt("compress", "option-nan", "-O", "shrinkage=nan"),
    opt("compress", "ratio-0", "--ratio", "0"),
    opt("compress", "ratio-1", "--ratio", "1"),
    opt("compress", "ratio-1.5", "--ratio", "1.5"),
    opt("compress", "ratio-negative", "--ratio", "-0.2"),
    opt("compress", "ratio-nan", "--ratio", "nan"),
    opt("compress", "ratio-inf", "--ratio", "inf"),
    opt("compress", "ratio-abc", "--ratio", "abc"),
    opt("compress", "min-rank-fraction-2", "--min-rank-fraction", "2"),
    opt("compress", "min-rank-fraction-nan", "--min-rank-fraction", "nan"),
    opt("compress", "allocation-bogus", "--allocation", "greedy"),
    opt("compress", "normalise-bogus", "--normalise", "sideways"),
    opt("compress", "budget-scope-bogus", "--budget-scope", "galaxy"),
    opt("compress", "format-bogus", "--format", "gguf"),
    opt("compress", "structure-bogus", "--structure", "3:4"),
    opt("compress", "calib-samples-0", "--calib-samples", "0"),
    opt("compress", "calib-samples-float", "--calib-samples", "1.5"),
    opt("compress", "calib-seqlen-99999", "--calib-seqlen", "99999"),
    long_text("compress", "calib-seqlen-past-positions", "--calib-seqlen", "1024"),
    opt("compress", "calib-seqlen-0", "--calib-seqlen", "0"),
    long_text("compress", "eval-seqlen-past-positions", "--eval-seqlen", "1024", "--eval-chars", "2000"),
    opt("compress", "eval-chars-0", "--eval-chars", "0"),
    opt("compress", "batch-size-0", "--batch-size", "0"),
    opt("compress", "batch-size-abc", "--batch-size", "abc"),
    opt("compress", "targets-bad-regex", "--targets", "mlp\\.(up"),
    opt("compress", "targets-match-nothing", "--targets", "no_such_layer"),
    opt("compress", "exclude-bad-regex", "--exclude", "[q"),
    opt("compress", "exclude-everything", "--exclude", "."),
    opt("compress", "devices-auto", "--devices", "auto"),
    opt("compress", "devices-two-gpus", "--devices", "cuda:0,cuda:1"),
    opt("compress", "devices-bogus", "--devices", "bogus"),
]

ADAPT = [
    opt("adapt", "method-unknown", "--method", "frobnicate"),
    opt("adapt", "method-of-other-verb", "--method", "svd-llm"),
    opt("adapt", "option-unknown-key", "-O", "bogus=1"),
    opt("adapt", "option-bad-value", "-O", "dropout=abc"),
    opt("adapt", "option-out-of-range", "-O", "dropout=1.5"),
    opt("adapt", "option-without-equals", "-O", "dropout"),
    opt("adapt", "rank-0", "--rank", "0"),
    opt("adapt", "rank-negative", "--rank", "-4"),
    opt("adapt", "rank-past-width", "--rank", "4096"),
    opt("adapt", "rank-abc", "--rank", "abc"),
    opt("adapt", "steps-0", "--steps", "0"),
    opt("adapt", "steps-negative", "--steps", "-1"),
    opt("adapt", "steps-x", "--steps", "x"),
    opt("adapt", "lr-negative", "--lr", "-1e-3"),
    opt("adapt", "lr-nan", "--lr", "nan"),
    opt("adapt", "lr-inf", "--lr", "inf"),
    opt("adapt", "alpha-nan", "--alpha", "nan"),
    opt("adapt", "weight-decay-negative", "--weight-decay", "-1"),
    opt("adapt", "max-grad-norm-nan", "--max-grad-norm", "nan"),
    opt("adapt", "warmup-negative", "--warmup-steps", "-1"),
    opt("adapt", "batch-size-0", "--batch-size", "0"),
    opt("adapt", "grad-accum-0", "--grad-accum", "0"),
    opt("adapt", "seqlen-99999", "--seqlen", "99999"),
    long_text("adapt", "seqlen-past-positions", "--seqlen", "1024"),
    opt("adapt", "seqlen-0", "--seqlen", "0"),
    opt("adapt", "precision-fp8", "--precision", "fp8"),
    opt("adapt", "format-bogus", "--format", "csv"),
    opt("adapt", "eval-every-negative", "--eval-every", "-1"),
    opt("adapt", "save-every-negative", "--save-every", "-1"),
    opt("adapt", "targets-bad-regex", "--targets", "(q_proj"),
    opt("adapt", "targets-match-nothing", "--targets", "no_such_layer"),
    opt("adapt", "packing-with-value", "--packing=yes"),
]

UNLEARN = [
    opt("unlearn", "method-unknown", "--method", "frobnicate"),
    opt("unlearn", "method-of-other-verb", "--method", "ties"),
    opt("unlearn", "option-unknown-key", "-O", "bogus=1"),
    opt("unlearn", "option-bad-value", "-O", "steps=abc"),
    opt("unlearn", "option-steps-0", "-O", "steps=0"),
    opt("unlearn", "option-layer-past-depth", "-O", "layer=99"),
    opt("unlearn", "option-modules-bad-regex", "-O", "modules=(mlp"),
    opt("unlearn", "option-without-equals", "-O", "steps"),
    opt("unlearn", "option-lr-nan", "-O", "lr=nan"),
    opt("unlearn", "seqlen-99999", "--seqlen", "99999"),
    long_text("unlearn", "seqlen-past-positions", "--seqlen", "1024"),
    opt("unlearn", "seqlen-0", "--seqlen", "0"),
    opt("unlearn", "forget-samples-0", "--forget-samples", "0"),
    opt("unlearn", "retain-samples-abc", "--retain-samples", "abc"),
    long_text("unlearn", "eval-seqlen-past-positions", "--eval-seqlen", "1024", "--eval-chars", "2000"),
    opt("unlearn", "batch-size-0", "--batch-size", "0"),
]

MERGE = [
    opt("merge", "method-unknown", "--method", "frobnicate"),
    opt("merge", "method-of-other-verb", "--method", "rmu"),
    opt("merge", "option-unknown-key", "-O", "bogus=1"),
    opt("merge", "option-bad-value", "-O", "lambda=abc"),
    opt("merge", "option-lambda-nan", "-O", "lambda=nan"),
    opt("merge", "option-without-equals", "-O", "lambda"),
    opt("merge", "option-of-other-method", "-O", "consensus=count"),
    opt("merge", "weights-inf", "--weights", "inf"),
    opt("merge", "weights-nan", "--weights", "nan"),
    opt("merge", "weights-one-nan", "--weights", "1,nan"),
    opt("merge", "weights-abc", "--weights", "abc"),
    opt("merge", "weights-too-many", "--weights", "1,1,1"),
    opt("merge", "weights-sum-zero-normalized", "--method", "linear", "--weights", "1,-1"),
    opt("merge", "density-2", "--method", "ties", "--density", "2"),
    opt("merge", "density-0", "--method", "ties", "--density", "0"),
    opt("merge", "density-negative", "--method", "dare-ties", "--density", "-0.5"),
    opt("merge", "density-nan", "--method", "ties", "--density", "nan"),
    opt("merge", "density-abc", "--method", "ties", "--density", "abc"),
    opt("merge", "density-too-many", "--method", "ties", "--density", "0.5,0.5,0.5"),
    opt("merge", "samples-0", "--samples", "0"),
    opt("merge", "seqlen-abc", "--seqlen", "abc"),
    Case("merge", "eval-seqlen-past-positions", lambda ctx: std(ctx, "merge", extra=[
        "--eval", f"t={ctx.text('long.txt', TEXT * 15)}", "--eval-seqlen", "1024", "--eval-chars", "2000"])),
]

INSPECT = [
    opt("inspect", "calib-seqlen-99999", "--calib-seqlen", "99999", calib=True),
    Case("inspect", "calib-seqlen-past-positions", lambda ctx: std(
        ctx, "inspect", data=ctx.text("long.txt", TEXT * 15), extra=["--calib-seqlen", "1024"])),
    opt("inspect", "calib-samples-0", "--calib-samples", "0", calib=True),
    opt("inspect", "targets-bad-regex", "--targets", "(q"),
    opt("inspect", "targets-match-nothing", "--targets", "no_such_layer"),
    opt("inspect", "exclude-bad-regex", "--exclude", "*"),
    opt("inspect", "batch-size-0", "--batch-size", "0", calib=True),
]

EVAL = [
    opt("eval", "eval-seqlen-99999", "--eval-seqlen", "99999", "--eval-chars", "9000"),
    opt("eval", "eval-seqlen-past-positions", "--eval-seqlen", "512", "--eval-chars", "9000", "--split", "all"),
    opt("eval", "eval-seqlen-0", "--eval-seqlen", "0"),
    opt("eval", "eval-chars-0", "--eval-chars", "0"),
    opt("eval", "split-bogus", "--split", "middle"),
    opt("eval", "batch-size-0", "--batch-size", "0"),
    opt("eval", "devices-auto", "--devices", "auto"),
    opt("eval", "devices-bogus", "--devices", "gpu0"),
    Case("eval", "data-missing-flag", lambda ctx: std(ctx, "eval", data=MISSING)),
]


CASES: list[Case] = [*COMPRESS, *ADAPT, *UNLEARN, *MERGE, *INSPECT, *EVAL]
for _verb in ("compress", "adapt", "unlearn", "merge", "inspect", "eval"):
    CASES += _common(_verb)


@pytest.mark.parametrize("case,as_json", params(CASES))
def test_bad_option(case, as_json, bad_ctx):
    run_case(case, as_json, bad_ctx)
