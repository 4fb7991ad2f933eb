"""Figures of the posterior checks: the predictive check and Laplace against MCMC.

Report layer (matplotlib, files): called by ``femkin uq`` and ``femkin sample`` on rank 0
with the JSON payloads they write, so a figure always shows what the JSON says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["mcmc_figure", "predictive_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def predictive_figure(out: Path, payload: dict) -> list[str]:
    """``uq_ppc.png``: the predictive check's figure.

    Standardised residuals against N(0, 1), and the observed average c(t) against the 95%
    posterior predictive band. Returns the names written.
    """
    check = payload.get("predictive_check", {})
    res = check.get("residuals")
    if not res or not res.get("n"):
        return []
    plt = _pyplot()
    c_t = payload.get("c_t")
    fig, axes = plt.subplots(1, 2 if c_t else 1, figsize=(9.5 if c_t else 4.8, 3.6), squeeze=False)
    ax = axes[0, 0]
    edges = np.asarray(res["histogram"]["edges"])
    counts = np.asarray(res["histogram"]["counts"], dtype=float)
    width = np.diff(edges)
    ax.bar(edges[:-1], counts / (counts.sum() * width), width=width, align="edge", alpha=0.6)
    r = np.linspace(edges[0], edges[-1], 200)
    ax.plot(r, np.exp(-0.5 * r * r) / np.sqrt(2 * np.pi), "k-", lw=1, label="N(0, 1)")
    ax.set_xlabel("(model - data) / sigma at the MAP point")
    ax.set_ylabel("density")
    ax.set_title(
        f"mean {res['mean']:.2f}, std {res['std']:.2f}; >2σ {100 * res['beyond_2']:.1f}% "
        f"(4.6%), >3σ {100 * res['beyond_3']:.2f}% (0.27%)",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    if c_t:
        ax = axes[0, 1]
        t = np.asarray(c_t["t"])
        for lb, entry in c_t["particles"].items():
            (line,) = ax.plot(t, entry["map"], label=f"particle {lb} (MAP)")
            if "pred_lo" in entry:
                ax.fill_between(
                    t, entry["pred_lo"], entry["pred_hi"], color=line.get_color(), alpha=0.25
                )
            ax.plot(t, entry["observed"], "x", color=line.get_color())
        ax.set_xlabel("t (s)")
        ax.set_ylabel("particle-average c")
        cov = c_t.get("coverage")
        ax.set_title(
            "observed (x) vs 95% predictive band"
            + (f": {100 * cov:.0f}% inside" if cov is not None else ""),
            fontsize=8,
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "uq_ppc.png", dpi=110)
    plt.close(fig)
    return ["uq_ppc.png"]


def mcmc_figure(out: Path, bands: dict) -> list[str]:
    """``mcmc_bands.png``: Laplace against MCMC bands.

    The 95% bands of mu_h(c) and j0(c) from the Laplace posterior and from the MCMC samples;
    ``bands[name] = {"c", "value", "laplace": (lo, hi), "mcmc": (lo, hi), "truth": optional}``.
    Returns the names written.
    """
    plt = _pyplot()
    names = [n for n in ("mu_h", "j0") if n in bands]
    if not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        b = bands[name]
        c = np.asarray(b["c"])
        ax.plot(c, b["value"], "k-", lw=1, label="MAP")
        ax.fill_between(c, *b["laplace"], color="C0", alpha=0.3, label="Laplace 95%")
        ax.plot(c, b["mcmc"][0], "C3--", lw=1, label="MCMC 95%")
        ax.plot(c, b["mcmc"][1], "C3--", lw=1)
        if b.get("truth") is not None:
            ax.plot(c, b["truth"], "g:", lw=1.2, label="truth")
        if name == "j0":
            ax.set_yscale("log")
        ax.set_xlabel("c")
        ax.set_ylabel(name + (" (kT)" if name == "mu_h" else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mcmc_bands.png", dpi=110)
    plt.close(fig)
    return ["mcmc_bands.png"]
