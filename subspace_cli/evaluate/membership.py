"""Loss-based membership inference: can the model's per-example loss tell training rows from unseen ones?

AUC = P(score(member) > score(non-member)) + ½·P(tie), with score = −mean token loss (the
Mann–Whitney U statistic over all pairs). 0.5: indistinguishable. After unlearning, forget rows
are the "members"; an AUC far below 0.5 means their loss is now suspiciously high, which is itself
a signal (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models", arXiv 2310.16789,
discuss loss-based attacks; the unlearning use follows TOFU / MUSE's privacy-leakage metrics).
"""

from __future__ import annotations

import torch

from subspace_cli.evaluate.perplexity import iter_batches, model_device, scored_chunks


@torch.inference_mode()
def window_losses(model, windows: torch.Tensor, batch_size: int = 8, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token loss of each window: [n] float64 (logits `chunk` positions at a time)."""
    device = model_device(model)
    out = []
    for ids in iter_batches(windows, batch_size, device):
        total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)  # [B] Σ over positions
        for logits, targets in scored_chunks(model, ids, chunk):  # [B, c, V], [B, c]
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            total += loss.view(targets.shape).double().sum(dim=1)  # [B]
        out.append((total / (ids.shape[1] - 1)).cpu())
    return torch.cat(out)


def auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> float:
    """Area under the ROC curve of scores that should be higher for members (ties count half).

    All member/non-member pairs at once: [n_m, n_n] comparisons, fine for the few hundred windows scored here.
    """
    m, n = member_scores.double()[:, None], nonmember_scores.double()[None, :]
    if m.numel() == 0 or n.numel() == 0:
        raise ValueError("membership AUC needs at least one member and one non-member")
    wins = (m > n).double().sum() + 0.5 * (m == n).double().sum()
    return float(wins / (m.numel() * n.numel()))


def membership_auc(model, members: torch.Tensor, nonmembers: torch.Tensor, batch_size: int = 8) -> float:
    """AUC of −loss separating `members` [n_m, L] from `nonmembers` [n_n, L]."""
    return auc(-window_losses(model, members, batch_size), -window_losses(model, nonmembers, batch_size))
