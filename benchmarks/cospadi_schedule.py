"""How often should cospadi re-run OMP? Whitened relative error and fit time per schedule.

On three matrices of SmolLM2-135M block 5 (q_proj, up_proj, down_proj), whitened with Grams
from 16 × 256 Shakespeare calibration tokens, at 20% removed (k/s = 2, sizes from the same
accounting as the compress verb), compares:

- svd-llm at the rank that stores the same number of parameters;
- OMP once on the SVD initialisation, then N K-SVD updates on fixed supports (the default);
- OMP after every update (the paper's alternation, `recode_every=1`).

    python benchmarks/cospadi_schedule.py [--updates 4 8 12]
"""

from __future__ import annotations

import argparse
import time

import torch

from subspace_cli.io import data
from subspace_cli.walk import weight_matrix
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.linalg.dictionary_budget import dictionary_size
from subspace_cli.linalg.sparse_dictionary import fit_dictionary
from subspace_cli.linalg.truncation import Transform, decompose
from subspace_cli.linalg.whitening import cholesky_whitener
from subspace_cli.pipelines.calibration import collect_dense_grams

LAYERS = r"layers\.5\.(self_attn\.q_proj|mlp\.up_proj|mlp\.down_proj)"
RATIO = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, nargs="+", default=[4, 8, 12])
    args = parser.parse_args()
    loaded = load_model_and_tokenizer("builtin:smollm2-135m")
    calibration = data.resolve_calibration("builtin:shakespeare", loaded.tokenizer, 16, 256, 0)
    grams = collect_dense_grams(loaded.model, calibration.input_ids, targets=LAYERS)
    print("| matrix | k / s | svd-llm | schedule | updates | whitened rel. error | fit s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, stats in grams.items():
        weight = weight_matrix(loaded.model.get_submodule(name)).detach()
        out_f, in_f = weight.shape
        spectral = decompose(weight, Transform("lower", cholesky_whitener(stats.covariance)))
        size = dictionary_size(in_f, out_f, (1 - RATIO) * in_f * out_f, k_over_s=2.0, max_atoms=spectral.s.numel())
        rank = int(size.params(in_f, out_f) // (in_f + out_f))
        energy = spectral.energy
        svd_llm = float((energy[rank:].sum() / energy.sum()).sqrt())
        target = (spectral.s[:, None] * spectral.u.T).float()
        initial = torch.eye(target.shape[0], size.atoms)
        for updates in args.updates:
            for label, recode in (("OMP once", 0), ("OMP every update", 1)):
                start = time.perf_counter()
                fit = fit_dictionary(target, initial, size.nonzeros, iterations=updates, recode_every=recode,
                                     tolerance=0.0)
                seconds = time.perf_counter() - start
                print(f"| {name.split('.', 3)[-1]} | {size.atoms} / {size.nonzeros} | {svd_llm:.4f} | {label} | "
                      f"{updates} | {fit.errors[-1]:.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
