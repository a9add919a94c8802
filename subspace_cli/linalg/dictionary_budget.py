"""Storage of a sparse-dictionary factorisation, and the (atoms, nonzeros) that fit a budget.

A matrix W [out, in] stored as D [k, in] and S [out, k] with s nonzeros per row costs, in units
of one 16-bit value (how these models ship; for fp32 checkpoints this overstates the positions'
share, never understates it):

    k·in / g           the dictionary, shared by the g matrices of a group (g = 1 per layer)
  + s·out              coefficient values
  + P / 2              positions, P bytes: min(s·out·2 as int16 indices, out·⌈k/8⌉ as a bitmask)

(int32 indices past 32,767 atoms). A low-rank factor of rank r costs r·(in + out) in the same
units, so the two are compared at equal bytes. docs/format.md states the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VALUE_BYTES = 2  # accounting unit: one 16-bit value


@dataclass(frozen=True)
class DictionarySize:
    atoms: int  # k
    nonzeros: int  # s per output
    positions: str  # "indices" | "bitmask": the smaller encoding of the atom ids

    def params(self, in_features: int, out_features: int, members: int = 1) -> float:
        """Cost of one member matrix in 16-bit units (its 1/members share of the dictionary)."""
        return (self.atoms * in_features / members + self.nonzeros * out_features
                + position_bytes(out_features, self.atoms, self.nonzeros)[1] / VALUE_BYTES)


def position_bytes(out_features: int, atoms: int, nonzeros: int) -> tuple[str, int]:
    """The smaller encoding of which atoms each output uses, and its size in bytes."""
    index_bytes = out_features * nonzeros * (2 if atoms <= 32767 else 4)
    mask_bytes = out_features * math.ceil(atoms / 8)
    return ("bitmask", mask_bytes) if mask_bytes < index_bytes else ("indices", index_bytes)


def _nonzeros(atoms: int, k_over_s: float) -> int:
    return int(atoms / k_over_s + 1e-9)


def dictionary_size(in_features: int, out_features: int, budget: float, *, k_over_s: float, max_atoms: int,
                    members: int = 1, structure: str | None = None) -> DictionarySize | None:
    """The largest k (s = ⌊k / k_over_s⌋) whose storage for all `members` fits `budget` units.

    None when even s = 1 does not fit, or when nothing is saved against keeping the members
    dense (the caller keeps them dense and says so). With structure "2:4", k is a multiple of 4.
    """
    step = 4 if structure == "2:4" else 1

    def size(atoms: int) -> DictionarySize:
        nonzeros = _nonzeros(atoms, k_over_s)
        return DictionarySize(atoms, nonzeros, position_bytes(out_features, atoms, nonzeros)[0])

    def cost(atoms: int) -> float:
        return size(atoms).params(in_features, out_features, members) * members

    smallest = math.ceil(math.ceil(k_over_s - 1e-9) / step) * step  # the first k with s >= 1
    candidates = range(smallest, max_atoms - max_atoms % step + 1, step)
    lo, hi, best = 0, len(candidates) - 1, None  # binary search: cost grows with k
    while lo <= hi:
        mid = (lo + hi) // 2
        if cost(candidates[mid]) <= budget:
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    if best is None or cost(best) >= members * in_features * out_features:
        return None
    return size(best)
