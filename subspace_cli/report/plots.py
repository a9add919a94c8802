"""Every figure the verbs write: training curves, weight spectra, merge mask densities.

Figures are drawn with matplotlib's Agg backend (no display) and written atomically by
`save_figure`, so a failed write never leaves half an image behind.
"""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, target: Path, dpi: int) -> None:
    """Write beside the target and rename; the format follows the target's suffix."""
    plt = _pyplot()
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(partial, dpi=dpi, format=target.suffix.lstrip(".").lower() or "png")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(fig)


def plot_curve(curve: list[dict], evals: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], lw=1, label="training loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, Path(path), dpi=100)


def plot_spectra(path: str, spectra: dict) -> None:
    """σ_i/σ_1 against i/len (log y), one line per matrix, one colour per layer kind."""
    plt = _pyplot()
    import numpy as np

    panels = [("plain", "weight spectra")] + ([("whitened", "whitened spectra (W·L)")] if spectra.get("whitened") else [])
    kinds = sorted({kind for kind, _ in spectra["plain"]})
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    colours = {kind: cmap(i % cmap.N) for i, kind in enumerate(kinds)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for kind, s in spectra[key]:
            x = np.arange(len(s)) / max(len(s), 1)
            ax.plot(x, np.clip(s, 1e-12, None), color=colours[kind], alpha=0.6, linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("i / number of singular values")
        ax.set_ylabel("σ_i / σ_1")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[k], label=k) for k in kinds]
    axes[0][-1].legend(handles=handles, fontsize="small", loc="lower left")
    fig.tight_layout()
    save_figure(fig, Path(path).expanduser(), dpi=120)


def plot_mask_density(tensors, path: Path, title: str) -> None:
    """Mask density per masked tensor (report rows with `mask_density`), in checkpoint order."""
    plt = _pyplot()
    rows = [t for t in tensors if t.mask_density is not None]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.08), 3.5))
    ax.bar(range(len(rows)), [t.mask_density for t in rows], width=1.0)
    ax.set_xlabel("masked tensor (checkpoint order)")
    ax.set_ylabel("mask density")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
