"""Result files of an inversion in ``CASE/results/`` (public names).

``summary.json``, ``fitted.npz``, ``mu_h.csv``, ``j0.csv``, ``k_<label>.npy``, PNG figures and
``report.md``. Files are written on rank 0, each atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from femkin.physics.acr import ln_j0, mu_h

C_GRID = np.linspace(0.01, 0.99, 99)


def atomic_write(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` then rename onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer(tmp)
    os.replace(tmp, path)


def curves(params) -> dict[str, np.ndarray]:
    """mu_h(c) and j0(c) on :data:`C_GRID`."""
    p, q = params.j0_prefactor
    return {
        "c": C_GRID,
        "mu_h": mu_h(C_GRID, params.mu_h, np.log),
        "j0": np.exp(ln_j0(C_GRID, params.j0, p, q, np.log)),
    }


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    names = list(columns)
    data = np.column_stack([columns[n] for n in names])
    atomic_write(
        path,
        lambda tmp: np.savetxt(
            tmp, data, delimiter=",", header=",".join(names), comments="", fmt="%.10g"
        ),
    )


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, w)


def figures(
    out: Path,
    params,
    truth: dict | None,
    fitted: np.ndarray,
    observed: np.ndarray,
    t: np.ndarray,
    k_maps: dict,
    history: list,
    band: dict | None = None,
) -> list[str]:
    """Draw the result figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    cv = curves(params)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "mu_h", "mu_h (kT)"), (axes[1], "j0", "j0")):
        ax.plot(cv["c"], cv[key], label="learned")
        if band and key in band:
            ax.fill_between(cv["c"], band[key][0], band[key][1], alpha=0.3, label="95% band")
        if truth is not None:
            from femkin.forward import ModelParameters

            tp = ModelParameters(
                mu_h=tuple(truth["mu_h"]),
                j0=tuple(truth["j0"]),
                j0_prefactor=tuple(truth["j0_prefactor"]),
            )
            ax.plot(cv["c"], curves(tp)[key], "k--", label="truth")
        ax.set_xlabel("c")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    names.append("curves.png")
    for label, k in k_maps.items():
        fig, ax = plt.subplots(1, 2 if truth is not None else 1, figsize=(8, 3.5), squeeze=False)
        im = ax[0, 0].imshow(k, cmap="magma")
        ax[0, 0].set_title(f"learned k, particle {label} (1/s)")
        fig.colorbar(im, ax=ax[0, 0])
        if truth is not None and "k" in truth:
            im = ax[0, 1].imshow(np.where(np.isfinite(k), truth["k"], np.nan), cmap="magma")
            ax[0, 1].set_title("true k")
            fig.colorbar(im, ax=ax[0, 1])
        fig.savefig(out / f"k_{label}.png", dpi=110)
        plt.close(fig)
        names.append(f"k_{label}.png")
    idx = np.unique(np.linspace(1, len(t) - 1, 4).astype(int))
    fig, axes = plt.subplots(3, len(idx), figsize=(2.6 * len(idx), 7.5), squeeze=False)
    for j, f in enumerate(idx):
        axes[0, j].imshow(observed[f], vmin=0, vmax=1)
        axes[0, j].set_title(f"observed t={t[f]:.0f}s", fontsize=8)
        axes[1, j].imshow(fitted[f], vmin=0, vmax=1)
        axes[1, j].set_title("fitted", fontsize=8)
        axes[2, j].imshow(fitted[f] - observed[f], vmin=-0.25, vmax=0.25, cmap="RdBu")
        axes[2, j].set_title("residual", fontsize=8)
        for i in range(3):
            axes[i, j].axis("off")
    fig.savefig(out / "frames.png", dpi=110)
    plt.close(fig)
    names.append("frames.png")
    if history:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        its = [h["iteration"] for h in history]
        ax.semilogy(its, [h["gradient_norm"] for h in history], label="gradient norm")
        ax.semilogy(its, [h["objective"] for h in history], label="objective")
        ax.set_xlabel("iteration")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=110)
        plt.close(fig)
        names.append("convergence.png")
    return names


def write_report(out: Path, summary: dict, figure_names: list[str], uq: dict | None = None):
    lines = [
        "# femkin results",
        "",
        f"- misfit RMS: {summary['misfit_rms']:.4f} (Li fraction)",
        f"- iterations: {summary['iterations']} ({summary['tao_reason']})",
        "- wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["wall_time"].items()),
        "",
        "## Learned coefficients",
        "",
    ]
    for k, v in summary["coefficients"].items():
        lines.append(f"- {k}: {v}")
    if "truth_comparison" in summary:
        lines += ["", "## Against the truth", ""]
        for k, v in summary["truth_comparison"].items():
            lines.append(f"- {k}: {v:.4g}")
    lines += ["", "## Particles", "", "| label | pixels | misfit RMS |", "|---|---|---|"]
    for label, p in summary["particles"].items():
        lines.append(f"| {label} | {p['n_pixels']} | {p['misfit_rms']:.4f} |")
    if uq:
        lines += ["", "## Uncertainty", "", f"- Hessian rank: {uq['rank']}"]
        lines += [f"- {note}" for note in uq.get("notes", [])]
        for k, v in uq["coefficients"].items():
            lines.append(
                f"- {k}: mean {np.round(v['mean'], 4).tolist()}, "
                f"std {np.round(v['std'], 4).tolist()}"
            )
    lines += [""] + [f"![{n}]({n})" for n in figure_names]
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
