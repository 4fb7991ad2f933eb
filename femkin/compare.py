"""Model comparison by the Laplace evidence: several cases fitted on the same data.

Each case directory is one model variant (kinetic law, learned blocks, priors) fitted to the
same video. :func:`femkin.uq.evidence.laplace_log_evidence` gives each fit's log evidence
``log p(d | model)`` in ``results/uq.json``; the log Bayes factor of model ``A`` over ``B`` is
``log Z_A - log Z_B``. Kass & Raftery's scale (in nats): below 1 not worth more than a mention,
1 to 3 positive, 3 to 5 strong, above 5 very strong.

This module reads the results, checks that the cases fit the same data (the same observed
``c``, mask, frame times and pixel size, and the same frames counted: an evidence is the
probability of the data it counts), builds the table (:func:`compare_table`) and writes
``compare.json``, ``compare.md`` and ``compare_curves.png`` (:func:`write_comparison`). The
``femkin compare`` verb runs the fits and the UQ steps that are missing first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from femkin.errors import InputError

__all__ = [
    "Entry",
    "check_same_data",
    "compare_table",
    "data_fingerprint",
    "model_description",
    "read_entry",
    "results_current",
    "write_comparison",
]

#: Kass & Raftery (1995) evidence categories of a log Bayes factor, in nats.
SCALE = ((1.0, "not worth more than a mention"), (3.0, "positive"), (5.0, "strong"))


def strength(log_bf: float) -> str:
    """Kass & Raftery's words for a log Bayes factor (nats) in favour of the better model."""
    for edge, word in SCALE:
        if log_bf < edge:
            return word
    return "very strong"


def _digest(a) -> str:
    h = hashlib.sha256()
    arr = np.ascontiguousarray(np.asarray(a, dtype=float))
    h.update(str(arr.shape).encode())
    h.update(np.nan_to_num(arr, nan=-7.77e307).tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(study) -> dict[str, str]:
    """What an evidence is the probability of: the observations and the frames counted.

    Args:
        study: a :class:`femkin.study.Study`.

    Returns:
        Digests of ``c``, ``mask``, ``t`` and the pixel size, and which frames count
        (``"1.."`` or ``"0.."``: frame 0 only when the initial state is learned).
    """
    video = study.video
    first = "0.." if "initial" in study.case.inversion["learn"] else "1.."
    return {
        "c": _digest(video.c),
        "mask": _digest(video.mask),
        "t": _digest(video.t),
        "pixel_size": repr(float(video.pixel_size)),
        "frames": first,
    }


def check_same_data(studies) -> None:
    """Refuse cases that do not fit the same data (one line naming both cases and the part).

    Raises:
        InputError: naming the second case's data file, the part that differs and the first
            case's.
    """
    ref = data_fingerprint(studies[0])
    for study in studies[1:]:
        prints = data_fingerprint(study)
        differ = [k for k in ref if prints[k] != ref[k]]
        if differ:
            what = ", ".join(
                "the frames counted (frame 0 counts only where 'initial' is learned)"
                if k == "frames"
                else k
                for k in differ
            )
            raise InputError(
                study.video_path,
                "data",
                f"the same data as {studies[0].case.dir} ({studies[0].video_path}) to compare "
                "evidences",
                f"a different {what}",
            )


def model_description(case) -> str:
    """One line naming the model variant of a case: kinetics, j0 form, learned blocks."""
    model, learn = case.model, list(case.inversion["learn"])
    parts = []
    kinetics = model.get("kinetics", "bv")
    if kinetics == "bv":  # Butler-Volmer with j0 = c^p (1-c)^q exp(sum b_n P_n)
        p, q = model["j0_prefactor"]
        n = len(model["j0"])
        form = f"c^{p:g}(1-c)^{q:g}"
        if n:
            form += f" exp(sum_{n} b_n P_n)" + (" learned" if "j0" in learn else " fixed")
        else:
            form += " fixed"
        parts.append(f"BV, j0 = {form}")
    elif kinetics == "bv-constant":
        parts.append("BV, j0 constant")
    elif kinetics == "bv-lim":
        parts.append("BV, j0 = c^alpha (1-c)^(1-alpha) / gamma (Lim et al. 2016)")
    else:
        lam = "learned" if "lambda" in learn else f"{model.get('lambda', float('nan')):g} kT"
        parts.append(f"{kinetics.upper()}, lambda {lam}")
    parts.append("learn " + ",".join(learn))
    return "; ".join(parts)


@dataclass
class Entry:
    """One case's row: its name, model and the numbers read from its results."""

    name: str
    case_dir: Path
    model: str
    evidence: dict
    misfit_rms: float
    converged: bool
    stop_reason: str
    curves: dict[str, dict[str, np.ndarray]]
    truth: dict[str, np.ndarray] | None = None
    k0: float = 1.0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            path, None, "the results of 'femkin run' (fit and uq)", "no such file"
        ) from None
    except (OSError, ValueError) as err:
        raise InputError(path, None, "a readable JSON file", str(err)) from None


def _read_curve(path: Path, name: str) -> dict[str, np.ndarray]:
    data = np.genfromtxt(path, delimiter=",", names=True)
    out = {"c": np.asarray(data["c"]), "value": np.asarray(data[name])}
    if data.dtype.names and "lo" in data.dtype.names:
        out["lo"], out["hi"] = np.asarray(data["lo"]), np.asarray(data["hi"])
    return out


def results_current(case_dir: Path) -> bool:
    """Whether ``results/`` holds a finished fit and the UQ step with an evidence, of one run.

    The fit's checkpoint must be finished (``done``) and ``results/uq.json`` must hold an
    ``evidence`` record of that fit run (``fit.run_id`` against ``results/run.json``); whether
    the checkpoint belongs to the current case file is the fit's own check (``femkin invert
    --resume``). Runs on one rank (the caller broadcasts).
    """
    results = case_dir / "results"
    try:
        uq = json.loads((results / "uq.json").read_text())
        runs = json.loads((results / "run.json").read_text())
    except (OSError, ValueError):
        return False
    if "evidence" not in uq:
        return False
    fit_id = (uq.get("fit") or {}).get("run_id")
    return fit_id is not None and fit_id == runs.get("invert", {}).get("run_id")


def read_entry(study, name: str | None = None) -> Entry:
    """The row of one case from its ``results/`` (``summary.json``, ``uq.json``, the curves).

    Raises:
        InputError: a missing or unreadable results file, or a ``uq.json`` without evidence.
    """
    from femkin.report import curves, read_truth

    case = study.case
    results = case.dir / "results"
    summary = _read_json(results / "summary.json")
    uq = _read_json(results / "uq.json")
    if "evidence" not in uq:
        raise InputError(
            results / "uq.json",
            "evidence",
            "the Laplace evidence (rerun 'femkin uq CASE' with this femkin)",
            "none",
        )
    # a kinetic law without a j0(c) curve (or a case without a curve file) plots what it has
    curve_data = {
        n: _read_curve(results / f"{n}.csv", n)
        for n in ("mu_h", "j0")
        if (results / f"{n}.csv").exists()
    }
    truth = None
    t = read_truth(study)
    if t is not None and {"mu_h", "j0", "j0_prefactor"} <= set(t):
        from femkin.forward import ModelParameters

        tv = curves(
            ModelParameters(
                mu_h=tuple(t["mu_h"]), j0=tuple(t["j0"]), j0_prefactor=tuple(t["j0_prefactor"])
            )
        )
        k0_true = float(t["k0"]) if "k0" in t else 1.0
        truth = {"c": tv["c"], "mu_h": tv["mu_h"], "j0": k0_true * tv["j0"]}
    return Entry(
        name=name or case.dir.name,
        case_dir=case.dir,
        model=model_description(case),
        evidence=uq["evidence"],
        misfit_rms=float(summary["misfit_rms"]),
        converged=bool(summary.get("converged", False)),
        stop_reason=str(summary.get("stop_reason", "")),
        curves=curve_data,
        truth=truth,
        k0=float(summary.get("coefficients", {}).get("k0", 1.0)),
    )


def compare_table(entries: list[Entry]) -> dict[str, Any]:
    """The comparison: rows sorted by log evidence, log Bayes factors against the best.

    ``log_bf`` of a row is ``log Z_best - log Z_row`` (>= 0), with the bracket that the two
    truncated tails allow (``[best.lower - row.upper, best.upper - row.lower]``, clipped below
    at the estimate's sign where they overlap) and Kass & Raftery's words for it.

    Returns:
        ``{"best", "rows": [...], "decisive"}``: ``decisive`` is true when the best model's
        lower bound beats every other's upper bound by more than 3 nats.
    """
    if not entries:
        raise ValueError("nothing to compare")
    order = sorted(entries, key=lambda e: -e.evidence["log_evidence"])
    best = order[0]
    b_lo, b_hi = best.evidence["bounds"]
    rows = []
    for e in order:
        ev = e.evidence
        lo, hi = ev["bounds"]
        log_bf = best.evidence["log_evidence"] - ev["log_evidence"]
        rows.append(
            {
                "case": e.name,
                "dir": str(e.case_dir),
                "model": e.model,
                "log_evidence": ev["log_evidence"],
                "log_evidence_bounds": [lo, hi],
                "log_bf_vs_best": log_bf,
                "log_bf_bounds": [b_lo - hi, b_hi - lo],
                "strength": "best" if e is best else strength(log_bf),
                "misfit_rms": e.misfit_rms,
                "n_parameters": ev["n_parameters"],
                "n_data": ev["n_data"],
                "effective_parameters": ev["effective_parameters"],
                "log_likelihood": ev["log_likelihood"],
                "prior_penalty": ev["prior_penalty"],
                "half_log_det": 0.5 * (ev["log_det_kept"] + ev["log_det_tail"]["estimate"]),
                "converged": e.converged,
                "stop_reason": e.stop_reason,
            }
        )
    others = rows[1:]
    decisive = bool(others) and all(r["log_bf_bounds"][0] > 3.0 for r in others)
    return {"best": best.name, "rows": rows, "decisive": decisive}


def _fmt_bounds(value: float, bounds) -> str:
    half = 0.5 * (bounds[1] - bounds[0])
    return f"{value:.2f}" + (f" ± {half:.2g}" if half > 5e-3 else "")


def markdown(table: dict[str, Any]) -> str:
    """``compare.md``: the table and what it says."""
    lines = [
        "# femkin compare: Laplace evidence",
        "",
        "log Z: Laplace log evidence (nats; ± half the bracket of the truncated spectrum's tail). "
        "log BF: log Z of the best minus this one. N_eff: data-informed directions, "
        "sum lambda / (1 + lambda).",
        "",
        "| case | model | log Z | log BF vs best | strength | misfit RMS | parameters | data "
        "| N_eff | log-lik | prior penalty | 1/2 log det | fit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        fit = "converged" if r["converged"] else f"NOT converged ({r['stop_reason']})"
        log_z = _fmt_bounds(r["log_evidence"], r["log_evidence_bounds"])
        lines.append(
            f"| {r['case']} | {r['model']} | {log_z} "
            f"| {r['log_bf_vs_best']:.2f} | {r['strength']} | {r['misfit_rms']:.4f} "
            f"| {r['n_parameters']} | {r['n_data']} | {r['effective_parameters']:.1f} "
            f"| {r['log_likelihood']:.2f} | {r['prior_penalty']:.2f} | {r['half_log_det']:.2f} "
            f"| {fit} |"
        )
    lines.append("")
    rows = table["rows"]
    if len(rows) > 1:
        second = rows[1]
        lines.append(
            f"The data favour **{table['best']}** over {second['case']} by a log Bayes factor of "
            f"{second['log_bf_vs_best']:.2f} ({second['strength']}; bracket "
            f"[{second['log_bf_bounds'][0]:.2f}, {second['log_bf_bounds'][1]:.2f}])."
            + (
                " Decisive: the bracket of every other model lies beyond 3 nats."
                if table["decisive"]
                else ""
            )
        )
    unconverged = [r["case"] for r in rows if not r["converged"]]
    if unconverged:
        lines.append(
            f"Fits that did not converge ({', '.join(unconverged)}): their evidence is taken at a "
            "point that is not the MAP point."
        )
    lines += ["", "![learned curves](compare_curves.png)", ""]
    return "\n".join(lines)


def curves_figure(path: Path, entries: list[Entry]) -> None:
    """``compare_curves.png``: the learned mu_h(c) and k0 j0(c) of every case, 95% bands.

    The rate prefactor is drawn as ``k0 j0(c)`` (1/s): each law normalises j0 its own way and
    k0 absorbs the scale, so only the product compares across laws (the band is that of j0's
    coefficients, at the MAP k0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    truth_drawn = False
    for i, e in enumerate(entries):
        colour = f"C{i % 10}"
        for ax, name in zip(axes, ("mu_h", "j0"), strict=True):
            cv = e.curves.get(name)
            if cv is None:
                continue
            scale = e.k0 if name == "j0" else 1.0
            ax.plot(cv["c"], scale * cv["value"], color=colour, lw=1.3, label=e.name)
            if "lo" in cv:
                ax.fill_between(
                    cv["c"], scale * cv["lo"], scale * cv["hi"], color=colour, alpha=0.18, lw=0
                )
        if e.truth is not None and not truth_drawn:
            for ax, name in zip(axes, ("mu_h", "j0"), strict=True):
                ax.plot(e.truth["c"], e.truth[name], "k:", lw=1.2, label="truth")
            truth_drawn = True
    axes[0].set_ylabel("mu_h (kT)")
    axes[1].set_ylabel("k0 j0 (1/s)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("c")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(out: Path, entries: list[Entry]) -> dict[str, Any]:
    """Write ``compare.json``, ``compare.md`` and ``compare_curves.png`` into ``out``.

    Returns:
        The ``compare.json`` content.
    """
    from femkin.io.atomic import atomic_write

    table = compare_table(entries)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(table, indent=2, allow_nan=True)
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    md = markdown(table)
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(md))
    curves_figure(out / "compare_curves.png", entries)
    return table
