"""What a study writes for people: summaries, figures, ``report.md`` and fields for ParaView.

The verbs call this module after the numerics are done:

- :func:`write_fit_results` (``femkin invert``): ``summary.json`` (misfit RMS per particle,
  learned coefficients, the stopping reason, comparisons with a twin's truth: the largest
  mu_h error on c in [0.1, 0.9] and the Pearson correlation of ln k), ``fitted.npz``,
  ``mu_h.csv``, ``j0.csv``, ``k_<label>.npy``, the figures and ``report.md``;
- :func:`write_uq_results` (``femkin uq``): ``uq.json``, the banded CSVs, the std maps of ln k,
  the figures with bands and the report with its uncertainty section;
- :func:`write_particle_fields` (both): per particle, for ParaView,
  ``particle_<label>_fields.xdmf`` (k (1/s), m and, after ``femkin uq``, the posterior std of
  ln k on the mesh) and ``particle_<label>_c_mu.xdmf`` (the fitted c and mu at the frame
  times);
- :func:`write_trajectory` and :func:`plot_frames` (``femkin simulate``).

File writes on rank 0 are atomic (:func:`femkin.io.atomic.atomic_write`); the field
files are written collectively by each particle's sub-communicator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from femkin.inversion.results import write_csv, write_json
from femkin.io.atomic import atomic_write
from femkin.outputs import results_dir
from femkin.physics.acr import C_GRID, mu_h

__all__ = [
    "C_GRID",
    "add_mcmc_section",
    "curves",
    "figures",
    "mcmc_report_lines",
    "plot_frames",
    "read_truth",
    "write_fit_results",
    "write_particle_fields",
    "write_report",
    "write_trajectory",
    "write_uq_results",
]


def curves(params) -> dict[str, np.ndarray]:
    """mu_h(c) and j0(c) on :data:`C_GRID`.

    j0(c) is the exchange factor of the model's kinetic law (the insertion rate at eta = 0 per
    unit k, :func:`femkin.physics.acr.j0_curve`): the learned ln j0 of ``"bv"``, the fixed
    closed forms of ``"bv-constant"`` and ``"bv-lim"``, or the CIET curve at its lambda.
    """
    return {
        "c": C_GRID,
        "mu_h": mu_h(C_GRID, params.mu_h, np.log),
        "j0": params.j0_curve(C_GRID),
    }


def _truth_parameters(truth: dict):
    from femkin.forward import ModelParameters

    # truth files written before the kinetic laws hold the default law ("bv")
    return ModelParameters(
        mu_h=tuple(truth["mu_h"]),
        j0=tuple(truth["j0"]),
        j0_prefactor=tuple(truth["j0_prefactor"]),
        alpha=float(truth.get("alpha", 0.5)),
        kinetics=str(truth.get("kinetics", "bv")),
        lambda_=float(truth.get("lambda", 8.3)),
    )


def coefficient_summary(params) -> dict:
    """The global coefficients for ``summary.json``: k0 in 1/s, lambda in kT.

    ``kinetics`` names the law; ``j0`` (the ln j0 Legendre coefficients) is only listed for the
    law that contains them (``"bv"``; empty otherwise), ``lambda`` only for ``"ciet"``.
    """
    out = {
        "kinetics": params.kinetics,
        "mu_h": list(params.mu_h),
        "j0": list(params.j0) if params.kinetics == "bv" else [],
        "k0": params.k0,
        "kappa": params.kappa,
        "coherency": params.coherency,
    }
    if params.kinetics == "ciet":
        out["lambda"] = params.lambda_
    return out


def law_j0_band(params, blocks, covariance, c: np.ndarray, z: float) -> tuple:
    """The j0(c) band of a fixed law: none, or from the posterior of ln lambda (CIET).

    ``blocks`` and ``covariance`` are the global coefficients' layout and posterior
    covariance (:class:`femkin.uq.laplace_study.LaplaceResult`). The curve of ``"ciet"``
    depends on lambda alone, so ``Var ln j0(c) = (d ln j0 / d ln lambda)^2 Var ln lambda``
    (linear propagation, as for the learned laws' bands; the derivative by central
    differences, step 1e-4 in ln lambda, error ~1e-9). Returns (value, lo, hi).
    """
    import dataclasses

    value = params.j0_curve(c)
    start, var = 0, 0.0
    for name, size in blocks:
        if name == "lambda" and params.kinetics == "ciet":
            var = float(covariance[start, start])
        start += size
    if var <= 0.0:
        return value, value.copy(), value.copy()
    h = 1e-4
    up = dataclasses.replace(params, lambda_=params.lambda_ * np.exp(h)).j0_curve(c)
    down = dataclasses.replace(params, lambda_=params.lambda_ * np.exp(-h)).j0_curve(c)
    std = np.abs(np.log(up) - np.log(down)) / (2 * h) * np.sqrt(var)
    return value, value * np.exp(-z * std), value * np.exp(z * std)


def read_truth(study) -> dict | None:
    """The twin's truth arrays (``simulated/truth.npz`` or ``[data] truth``), or None."""
    if study.truth_path is None or not Path(study.truth_path).exists():
        return None
    with np.load(study.truth_path) as z:
        return {k: z[k] for k in z.files}


# -- fields for ParaView -------------------------------------------------------------------------
def write_trajectory(model, traj, path: Path, fmt: str = "xdmf") -> None:
    """The c and mu of one particle at the frame times: XDMF (``.xdmf`` + ``.h5``) or VTX (``.bp``).

    Collective on the particle's communicator.
    """
    from femkin._fem import dolfinx

    Vmu, _ = model.W.sub(1).collapse()
    c = dolfinx.fem.Function(model.V, name="c")
    mu = dolfinx.fem.Function(Vmu, name="mu")

    def load(n):
        state = traj.state(n)
        c.x.array[:] = state[model.c_dofs]
        mu.x.array[:] = state[model.mu_dofs]

    if fmt == "xdmf":
        with dolfinx.io.XDMFFile(model.comm, str(path), "w") as xdmf:
            xdmf.write_mesh(model.mesh)
            for n in traj.frame_steps:
                load(n)
                xdmf.write_function(c, traj.times[n])
                xdmf.write_function(mu, traj.times[n])
    elif fmt == "vtx":
        with dolfinx.io.VTXWriter(model.comm, str(path), [c, mu], engine="BP4") as vtx:
            for n in traj.frame_steps:
                load(n)
                vtx.write(traj.times[n])
    else:
        raise ValueError(f"{fmt=} is not 'xdmf' or 'vtx'")


def write_particle_fields(
    problem, x, out: Path, *, ln_k_std: dict[int, np.ndarray] | None = None
) -> list[str]:
    """Write the fitted fields of every particle for ParaView (collective on ``problem.comm``).

    ``particle_<label>_fields.xdmf`` holds k = k0 exp(m) (1/s), m and, when given, the
    posterior std of ln k (``ln_k_std``: ``{label: values on the P1 space}`` for this rank's
    particles); ``particle_<label>_c_mu.xdmf`` holds the fitted c and mu at the frame times of
    the last forward run (at ``x``). ``out`` must exist.

    Returns:
        The file names, for the report (the same on every rank).
    """
    from femkin._fem import dolfinx

    k0 = problem.parameters_at(x).k0
    for label, p in problem.particles.items():
        model = p.model
        functions = [dolfinx.fem.Function(model.V, name=name) for name in ("k", "m")]
        functions[1].x.array[:] = model.m.x.array
        functions[0].x.array[:] = k0 * np.exp(model.m.x.array)
        if ln_k_std is not None and label in ln_k_std:
            std = dolfinx.fem.Function(model.V, name="ln_k_std")
            std.x.array[:] = ln_k_std[label]
            functions.append(std)
        with dolfinx.io.XDMFFile(model.comm, str(out / f"particle_{label}_fields.xdmf"), "w") as f:
            f.write_mesh(model.mesh)
            for fn in functions:
                f.write_function(fn, 0.0)
        if p.trajectory is not None:
            write_trajectory(model, p.trajectory, out / f"particle_{label}_c_mu.xdmf")
    names = []
    for label in problem.labels:
        names += [f"particle_{label}_fields.xdmf", f"particle_{label}_c_mu.xdmf"]
    return names


def _results_dir(study, comm) -> Path:
    # the staging folder of an open result set (femkin.outputs.ResultSet), else CASE/results
    out = results_dir(study.case.dir)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    return out


# -- the fit -------------------------------------------------------------------------------------
def write_fit_results(study, problem, result, timings: dict) -> dict | None:
    """Summaries, tables, figures, fields and the report of a fit at ``result.x``.

    The problem's last forward run must be at ``result.x``. Collective; returns the summary on
    rank 0, None elsewhere.
    """
    video = study.video
    comm = problem.comm
    out = _results_dir(study, comm)
    fitted = problem.fitted_video()
    params = problem.parameters_at(result.x)
    psf_fwhm = problem.psf_at(result.x)
    m_pix = problem.field_on_pixels("m", result.x) if "m" in problem.learn else None
    field_files = write_particle_fields(problem, result.x, out)
    if comm.rank != 0:
        return None
    obs = video.c.copy()
    first = 0 if problem.include_first else 1
    resid = (fitted - obs)[first:]
    summary_particles = {}
    k_maps = {}
    for label in problem.labels:
        inside = video.mask == label
        r = resid[:, inside]
        r = r[np.isfinite(r)]
        summary_particles[str(label)] = {
            "misfit_rms": float(np.sqrt(np.mean(r**2))),
            "n_pixels": int(inside.sum()),
        }
        m = m_pix if m_pix is not None else np.zeros(video.mask.shape)
        k = np.where(inside, params.k0 * np.exp(np.nan_to_num(m)), np.nan)
        k_maps[label] = k
        np.save(out / f"k_{label}.npy", k)
    all_r = resid[np.isfinite(resid)]
    coeffs = coefficient_summary(params)
    if psf_fwhm is not None:
        coeffs["psf_fwhm"] = psf_fwhm  # um; learned when "psf_fwhm" is in learn
    summary = {
        "misfit_rms": float(np.sqrt(np.mean(all_r**2))),
        "particles": summary_particles,
        "iterations": int(result.iterations),
        "converged": bool(getattr(result, "converged", result.reason.startswith("CONVERGED"))),
        "stop_reason": getattr(result, "stop_reason", "") or result.reason,
        "tao_reason": result.reason,
        "convergence": dict(
            getattr(result, "stats", None) or {}, iterations=int(result.iterations)
        ),
        "wall_time": dict(timings),
        "coefficients": coeffs,
        "objective": result.value,
        "misfit": result.misfit,
        "n_observed": int(problem.n_observed),
        "solves": dict(problem.counters),
        "fields": field_files,
    }
    truth = read_truth(study)
    cv = curves(params)
    if truth is not None:
        tv = curves(_truth_parameters(truth))
        sel = (cv["c"] >= 0.1) & (cv["c"] <= 0.9)
        comp: dict[str, float] = {
            "mu_h_max_error_kT": float(np.max(np.abs(cv["mu_h"] - tv["mu_h"])[sel]))
        }
        truth_params = _truth_parameters(truth)
        if params.kinetics == truth_params.kinetics == "ciet":
            comp["lambda_relative_error"] = float(params.lambda_ / truth_params.lambda_ - 1.0)
        if m_pix is not None:
            inside = video.mask > 0
            comp["ln_k_pearson"] = float(
                np.corrcoef(np.log(params.k0) + m_pix[inside], np.log(truth["k"][inside]))[0, 1]
            )
        comp["noise"] = float(truth.get("noise", np.nan))
        true_psf = float(truth.get("psf_fwhm", np.nan))  # NaN: point-sampled data
        if np.isfinite(true_psf) or psf_fwhm is not None:
            comp["psf_fwhm_true_um"] = true_psf  # NaN where one side is point sampling
            comp["psf_fwhm_fitted_um"] = np.nan if psf_fwhm is None else psf_fwhm
        summary["truth_comparison"] = comp
    np.savez(out / "fitted.npz", c=fitted, t=video.t)
    write_csv(out / "mu_h.csv", {"c": cv["c"], "mu_h": cv["mu_h"]})
    write_csv(out / "j0.csv", {"c": cv["c"], "j0": cv["j0"]})
    names = figures(out, params, truth, fitted, obs, video.t, k_maps, result.history)
    write_json(out / "summary.json", summary)
    write_report(out, summary, names)
    return summary


# -- the Laplace posterior -------------------------------------------------------------------------
def write_uq_results(study, problem, x, result, payload: dict | None, history: list) -> None:
    """uq.json, the banded CSVs, the std maps, the figures, the fields and the report.

    Collective (``payload`` is the ``uq.json`` content on rank 0; the problem's last forward
    run must be at the MAP point ``x``).
    """
    import json

    comm = problem.comm
    out = _results_dir(study, comm)
    params = problem.parameters_at(x)
    write_particle_fields(problem, x, out, ln_k_std=result.ln_k_std_dofs)
    if payload is None:  # ranks other than 0
        return
    video = study.video
    write_json(out / "uq.json", payload)
    bands = dict(result.bands)
    if params.kinetics != "bv":  # the bands of the uq step are those of the learned ln j0
        from femkin.uq.laplace_study import Z95

        bands["j0"] = law_j0_band(params, result.blocks, result.covariance, bands["c"], Z95)
    for name in ("mu_h", "j0"):
        value, lo, hi = bands[name]
        write_csv(out / f"{name}.csv", {"c": bands["c"], name: value, "lo": lo, "hi": hi})
    for lb in problem.labels:
        np.save(out / f"k_std_{lb}.npy", result.ln_k_std[lb])
        np.save(out / f"k_prior_std_{lb}.npy", result.ln_k_prior_std[lb])
    truth = read_truth(study)
    k_maps = {}
    for lb in problem.labels:
        path = out / f"k_{lb}.npy"
        if path.exists():
            k_maps[lb] = np.load(path)
    names = figures(
        out,
        params,
        truth,
        result.fitted,
        video.c,
        video.t,
        k_maps,
        history,
        band={"mu_h": bands["mu_h"][1:], "j0": bands["j0"][1:]},
    )
    names += uq_figures(out, result, payload)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        write_report(out, summary, names, uq=payload)


#: Blocks whose coordinate is not the quantity itself, as the report names them.
_COORDINATE_NAMES = {
    "k0": "k0 (coordinate ln k0)",
    "lambda": "lambda (coordinate ln lambda)",
    "psf_fwhm": "psf_fwhm (coordinate ln psf_fwhm)",
}


# -- figures and the report ----------------------------------------------------------------------
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
            ax.plot(cv["c"], curves(_truth_parameters(truth))[key], "k--", label="truth")
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


def uq_figures(out: Path, result, payload: dict) -> list[str]:
    """The std maps of ln k, the eigenvalues and the c(t) band; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    labels = list(result.ln_k_std)
    if labels:
        # top: posterior std of ln k; bottom: over the prior std (the data's effect alone)
        fig, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels), 7.0), squeeze=False)
        for col, lb in enumerate(labels):
            std, prior_std = result.ln_k_std[lb], result.ln_k_prior_std[lb]
            for ax, image, title in (
                (axes[0, col], std, f"posterior std of ln k, particle {lb}"),
                (axes[1, col], std / prior_std, f"posterior / prior std, particle {lb}"),
            ):
                im = ax.imshow(image, cmap="viridis")
                ax.set_title(title, fontsize=9)
                fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "uq_k_std.png", dpi=110)
        plt.close(fig)
        names.append("uq_k_std.png")
    lam = np.asarray(payload["eigenvalues"])
    if lam.size:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        pos = lam > 0
        ax.semilogy(np.arange(1, lam.size + 1)[pos], lam[pos], "o-")
        ax.axhline(payload["threshold"], color="k", ls="--", lw=0.8, label="threshold")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue of the prior-preconditioned Hessian")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "uq_eigenvalues.png", dpi=110)
        plt.close(fig)
        names.append("uq_eigenvalues.png")
    c_t = payload.get("c_t")
    if c_t:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        t = np.asarray(c_t["t"])
        for lb, entry in c_t["particles"].items():
            (line,) = ax.plot(t, entry["map"], label=f"particle {lb} (MAP)")
            if "lo" in entry:
                ax.fill_between(t, entry["lo"], entry["hi"], color=line.get_color(), alpha=0.3)
            ax.plot(t, entry["observed"], "x", color=line.get_color())
        ax.set_xlabel("t (s)")
        ax.set_ylabel("particle-average c")
        ax.set_title(
            f"95% band from {c_t['samples'] - c_t['failed']} posterior samples", fontsize=9
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "uq_c_t.png", dpi=110)
        plt.close(fig)
        names.append("uq_c_t.png")
    from femkin.uq_report import predictive_figure

    return names + predictive_figure(out, payload)


def plot_frames(noisy, clean, t, path, n_show: int = 5) -> None:
    """Model and noisy frames of a simulated video side by side (``femkin simulate``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.unique(np.linspace(0, len(t) - 1, n_show).astype(int))
    fig, axes = plt.subplots(2, len(idx), figsize=(2.4 * len(idx), 5), squeeze=False)
    for j, f in enumerate(idx):
        for i, (img, name) in enumerate(((clean, "model"), (noisy, "noisy"))):
            ax = axes[i, j]
            im = ax.imshow(img[f], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name}, t = {t[f]:.0f} s", fontsize=8)
            ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="c")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _convergence_lines(summary: dict) -> list[str]:
    """Why the fit stopped, with the numbers behind it (report lines)."""
    if "stop_reason" not in summary:
        return []
    c = summary.get("convergence", {})
    lines = [f"- stopped: {summary['stop_reason']}"]
    numbers = []
    if c.get("decrement") is not None and np.isfinite(c["decrement"]):
        numbers.append(f"Newton decrement {c['decrement']:.3g} nats (tol {c['decrement_tol']:g})")
    if c.get("gradient_norm") is not None:
        numbers.append(f"gradient norm {c['gradient_norm']:.3g}")
    if c.get("relative_gradient") is not None:
        numbers.append(f"relative gradient {c['relative_gradient']:.3g}")
    for key, label in (
        ("gradient_evaluations", "gradient evaluations"),
        ("hessian_actions", "Hessian actions"),
    ):
        if c.get(key) is not None:
            numbers.append(f"{c[key]} {label}")
    if "forward" in summary.get("solves", {}):
        numbers.append(f"{summary['solves']['forward']} forward solves")
    if numbers:
        lines.append("- convergence: " + ", ".join(numbers))
    return lines


def write_report(out: Path, summary: dict, figure_names: list[str], uq: dict | None = None):
    """``report.md``: the summary, the truth comparison, particles, uncertainty, figures."""
    lines = [
        "# femkin results",
        "",
        f"- misfit RMS: {summary['misfit_rms']:.4f} (Li fraction)",
        f"- iterations: {summary['iterations']} ({summary['tao_reason']})",
        *_convergence_lines(summary),
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
            name = _COORDINATE_NAMES.get(k, k)
            moved = "map" in v and v["map"] != v["mean"]
            lines.append(
                f"- {name}: mean {np.round(v['mean'], 4).tolist()}, "
                f"std {np.round(v['std'], 4).tolist()}"
                + (f" (joint MAP {np.round(v['map'], 4).tolist()})" if moved else "")
            )
    if summary.get("fields"):
        lines += [
            "",
            "## Fields for ParaView",
            "",
            "Per particle: `particle_<label>_fields.xdmf` (k in 1/s, m"
            + (", posterior std of ln k" if uq else "")
            + ") and `particle_<label>_c_mu.xdmf` (fitted c and mu at the frame times):",
            "",
        ]
        lines += [f"- `{name}`" for name in summary["fields"]]
    lines += [""] + [f"![{n}]({n})" for n in figure_names]
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


#: The heading of the section ``femkin sample`` adds to ``report.md``.
MCMC_HEADING = "## MCMC check of the Laplace approximation"


def mcmc_report_lines(payload: dict) -> list[str]:
    """The ``report.md`` section of ``femkin sample`` (``payload``: the ``mcmc.json`` content)."""
    from femkin.uq.sampling_study import uses_gradient

    check = payload.get("laplace_check", {})
    lines = [
        MCMC_HEADING,
        "",
        f"- {payload['chains']} chains of {max(payload['steps_per_chain'])} steps "
        f"({payload.get('kernel', 'gpCN')}, {payload['settings']['proposal']} proposal, "
        f"beta {payload['settings']['beta']}), "
        f"acceptance {payload['acceptance_overall']:.2f}, min ESS {payload['min_ess']:.0f}, "
        f"max split-R-hat {payload['max_rhat']:.3f}, "
        f"{payload['forward_runs_per_effective_sample']:.1f} "
        f"{'gradient' if uses_gradient(payload['settings']) else 'forward'} runs per "
        "effective sample",
        f"- verdict: {check.get('verdict', 'no Laplace values to compare with')}",
        *(
            [f"- proposal ({payload['proposal_centre']}): {payload['reference_fit']}"]
            if "reference_fit" in payload
            else []
        ),
        *([f"- HMC step: {payload['hmc_step']['note']}"] if "hmc_step" in payload else []),
        "",
        "| coefficient | Laplace mean | Laplace std | MCMC mean | MCMC std | dmean / std | "
        "std ratio | skewness | ESS | R-hat |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in payload["coefficients"].items():
        lap = f"{v['laplace_mean']:.4g} | {v['laplace_std']:.3g}" if "laplace_std" in v else "- | -"
        cmp = (
            f"{v['mean_difference_in_std']:+.2f} | {v['std_ratio']:.2f}"
            if "std_ratio" in v
            else "- | -"
        )
        lines.append(
            f"| {name} | {lap} | {v['mean']:.4g} | {v['std']:.3g} | {cmp} | "
            f"{v['skewness']:+.2f} | {v['ess']:.0f} | {v['rhat']:.3f} |"
        )
    lines += ["", "![mcmc_bands.png](mcmc_bands.png)"]
    return lines


def add_mcmc_section(out: Path, payload: dict) -> None:
    """Put the MCMC section into ``out/report.md`` (replacing an earlier one; rank 0).

    Does nothing when there is no report (``femkin uq`` writes it).
    """
    path = Path(out) / "report.md"
    if not path.exists():
        return
    text = path.read_text()
    start = text.find(MCMC_HEADING)
    if start >= 0:
        end = text.find("\n## ", start + len(MCMC_HEADING))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    text = text.rstrip("\n") + "\n\n" + "\n".join(mcmc_report_lines(payload)) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
