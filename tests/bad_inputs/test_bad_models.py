"""Bad model references, for every verb that reads a model: missing, not a directory, broken
config.json, quantized, no / corrupt / pickle-only / non-finite weights, unknown architecture,
no tokenizer, an already factored checkpoint. Expected: exit 2 (non-finite weights are named on
load), one `error:` line, nothing written."""

from __future__ import annotations

import pytest

from bad_input_harness import BROKEN_MODELS, MISSING, Case, broken_model, params, run_case, std

pytestmark = pytest.mark.slow  # the bad-input sweep (hundreds of CLI runs) is the slow tier

VERBS = ("compress", "adapt", "unlearn", "inspect", "eval", "merge")
# inspect without --calib reads no tokenizer (it is given --calib for that case). merge copies the
# base's tokenizer and needs none in the other models (tests/test_merge_inputs.py covers a base without).
SKIP = {("merge", "no-tokenizer")}


def _model_case(verb: str, kind: str) -> Case:
    make = broken_model(kind)

    def build(ctx):
        # inspect needs a tokenizer only with --calib: give it one for the tokenizer case.
        return std(ctx, verb, model=make(ctx), calib=(verb == "inspect" and kind == "no-tokenizer"))

    return Case(verb, f"model-{kind}", build)


CASES: list[Case] = [_model_case(verb, kind) for verb in VERBS for kind in BROKEN_MODELS if (verb, kind) not in SKIP]

# A previously compressed (factored) checkpoint given to compress again.
CASES.append(Case("compress", "model-factored", lambda ctx: std(ctx, "compress", model=ctx.model("factored"))))
# Merging a factored checkpoint with dense fine-tunes: different tensors.
CASES.append(Case("merge", "model-factored", lambda ctx: std(ctx, "merge", model=ctx.model("factored"))))
# A missing model given as an absolute path, an empty string, an uncached hub id, an unknown builtin.
CASES.append(Case("compress", "model-missing-absolute",
                  lambda ctx: std(ctx, "compress", model=ctx.absolute("no-such-model"))))
CASES.append(Case("compress", "model-empty-string", lambda ctx: std(ctx, "compress", model="")))
CASES.append(Case("eval", "model-empty-string", lambda ctx: std(ctx, "eval", model="")))
CASES.append(Case("compress", "model-hub-id-not-cached",
                  lambda ctx: std(ctx, "compress", model="nobody-xyz/not-a-cached-model")))
CASES.append(Case("compress", "model-builtin-unknown", lambda ctx: std(ctx, "compress", model="builtin:nope")))

# Broken merge bases (the inputs are fine).
for _kind in ("missing", "file", "no-config", "config-invalid-json", "unknown-arch", "no-weights", "pickle-only"):
    def _base_case(kind=_kind):
        def build(ctx):
            argv = std(ctx, "merge")
            argv[argv.index("--base") + 1] = broken_model(kind, "broken-base")(ctx)
            return argv

        return Case("merge", f"base-{kind}", build)

    CASES.append(_base_case())

# Broken eval baselines.
for _kind in ("missing", "file", "no-config", "no-weights", "corrupt-weights", "unknown-arch"):
    def _baseline_case(kind=_kind):
        return Case("eval", f"baseline-{kind}", lambda ctx: std(
            ctx, "eval", extra=["--baseline", broken_model(kind, "broken-baseline")(ctx)]))

    CASES.append(_baseline_case())

# A model that is missing but would be fine to leave out: the required argument is absent.
CASES.append(Case("inspect", "model-argument-absent", lambda ctx: std(ctx, "inspect", model=MISSING)))


@pytest.mark.parametrize("case,as_json", params(CASES))
def test_bad_model(case, as_json, bad_ctx):
    run_case(case, as_json, bad_ctx)
