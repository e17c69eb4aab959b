"""Figures of a fit: loss vs compute per r, IsoFLOP profiles, phi's bootstrap distribution, residuals.

The law's curves need, for each r, how FLOPs per token and the once/recurrent split grow with model
size. That is read off the runs themselves (a log-log line of F against unique parameters per r, and
the median N_rec share), so any store can be plotted without knowing the model family.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .data import RunTable
from .law import ScalingLaw


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _tick_label(x: float) -> str:
    """'2e3', '3e4', '0.5': short enough that a handful of labels fit under a narrow panel."""
    return f"{x:.2g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _log_x_ticks(ax, max_ticks: int = 5) -> None:
    """Readable ticks on a log x axis: at most `max_ticks` labelled values of the 1, 2, 5 x 10^k kind inside the view,
    no minor labels. Matplotlib labels minor ticks (2x10^3, 3x10^3, ...) on axes spanning under a decade or so, and
    on a 4-inch panel they run into each other."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = sorted(ax.get_xlim())
    if not (lo > 0 and math.isfinite(hi)):
        return
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mults in ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        inside = [m * 10.0 ** k for k in decades for m in mults if lo <= m * 10.0 ** k <= hi]
        if len(inside) > max_ticks:
            if not ticks:  # many decades: every n-th power of ten
                step = math.ceil(len(inside) / max_ticks)
                ticks = inside[::step]
            break
        ticks = inside
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:  # a sliver of a decade: two or three values spread over it
        ticks = sorted({float(f"{v:.2g}") for v in np.geomspace(lo, hi, 4)[1:-1]} | set(ticks))
    ax.set_xlim(lo, hi)  # fixed: the ticks were chosen for these limits
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _tick_label(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(plt, fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xscale() == "log":
            _log_x_ticks(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


class _FamilyOfR:
    """F(N_unique) and N_rec share for one r, fitted to that r's runs."""

    def __init__(self, frame, r: float):
        rows = frame[frame["r"] == r]
        n = (rows["n_once"] + rows["n_rec"]).to_numpy(float)
        f = (rows["compute"] / rows["tokens"]).to_numpy(float)
        self.rec_share = float(np.median(rows["n_rec"] / (rows["n_once"] + rows["n_rec"])))
        if len(np.unique(n)) >= 2:
            self.slope, self.icept = np.polyfit(np.log(n), np.log(f), 1)
        else:  # one size only: F proportional to N through that point
            self.slope, self.icept = 1.0, float(np.log(f[0] / n[0]))
        self.n_range = (float(n.min()), float(n.max()))
        self.r = r

    def flops_per_token(self, n_unique):
        return np.exp(self.icept + self.slope * np.log(n_unique))

    def loss_at_compute(self, law: ScalingLaw, n_unique, compute):
        n_unique = np.asarray(n_unique, float)
        tokens = compute / self.flops_per_token(n_unique)
        return law.predict(n_unique * (1 - self.rec_share), n_unique * self.rec_share, self.r, tokens)


def _colors(values):
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    vals = sorted(values)
    return {v: cmap(i / max(1, len(vals) - 1)) for i, v in enumerate(vals)}


def plot_loss_vs_compute(table: RunTable, law: ScalingLaw, path: Path) -> Path:
    plt = _pyplot()
    f = table.frame
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = _colors(f["r"].unique())
    c_grid = np.geomspace(f["compute"].min() / 1.5, f["compute"].max() * 1.5, 40)
    for r, color in colors.items():
        rows = f[f["r"] == r]
        ax.scatter(rows["compute"], rows["val_loss"], s=14, color=color, alpha=0.7, label=f"r={r:g} runs")
        fam = _FamilyOfR(f, r)
        n_grid = np.geomspace(fam.n_range[0] / 4, fam.n_range[1] * 4, 200)
        frontier = [np.min(fam.loss_at_compute(law, n_grid, c)) for c in c_grid]
        ax.plot(c_grid, frontier, color=color, lw=1.5, label=f"r={r:g} law (compute-optimal)")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Loss vs compute, fitted law per r")
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_isoflop(table: RunTable, law: ScalingLaw, path: Path) -> Path:
    plt = _pyplot()
    f = table.frame
    r_values = sorted(f["r"].unique())
    fig, axes = plt.subplots(1, len(r_values), figsize=(4.2 * len(r_values), 4), sharey=True, squeeze=False)
    budgets = sorted(f["budget"].unique(), key=lambda b: f.loc[f["budget"] == b, "compute"].median())
    colors = {b: c for b, c in zip(budgets, _colors(range(len(budgets))).values())}
    for ax, r in zip(axes[0], r_values):
        fam = _FamilyOfR(f, r)
        for b in budgets:
            rows = f[(f["r"] == r) & (f["budget"] == b)]
            if rows.empty:
                continue
            n = rows["n_once"] + rows["n_rec"]
            label = table.budget_labels.get(b, str(b))
            ax.scatter(n, rows["val_loss"], s=16, color=colors[b], label=f"C={label}")
            n_grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 80)
            ax.plot(n_grid, fam.loss_at_compute(law, n_grid, rows["compute"].median()), color=colors[b], lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("unique parameters N_once + N_rec")
        ax.set_title(f"IsoFLOP profiles, r={r:g}")
    axes[0][0].set_ylabel("validation loss (nats)")
    axes[0][-1].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_phi_bootstrap(law: ScalingLaw, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    draws = law.draws[:, 5] if law.draws is not None else np.array([])
    draws = draws[np.isfinite(draws)]
    if law.phi is None or len(draws) == 0:
        reason = "dense form: no phi" if law.phi is None else "no bootstrap draws (fit with bootstrap > 0)"
        ax.text(0.5, 0.5, reason, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ax.hist(draws, bins=min(50, max(10, len(draws) // 20)), color="tab:blue", alpha=0.75)
        ax.axvline(law.phi, color="k", lw=1.5, label=f"phi = {law.phi:.3f}")
        if "phi" in law.ci:
            lo, hi = law.ci["phi"]
            for x in (lo, hi):
                ax.axvline(x, color="k", ls="--", lw=1)
            ax.set_title(f"phi bootstrap ({len(draws)} draws), 95% CI [{lo:.3f}, {hi:.3f}]")
        ax.set_xlabel("phi")
        ax.set_ylabel("draws")
        ax.legend()
    return _save(plt, fig, path)


def plot_residuals(table: RunTable, law: ScalingLaw, path: Path) -> Path:
    plt = _pyplot()
    f = table.frame
    pred = np.asarray(law.predict(f["n_once"], f["n_rec"], f["r"], f["tokens"]), float)
    rel = f["val_loss"].to_numpy(float) / pred - 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, color in _colors(f["r"].unique()).items():
        m = (f["r"] == r).to_numpy()
        ax.scatter(f["compute"][m], 100 * rel[m], s=14, color=color, label=f"r={r:g}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("residual: actual / predicted - 1 (%)")
    ax.set_title("Residuals of the fitted law")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_all(table: RunTable, law: ScalingLaw, out_dir: str | Path) -> list[Path]:
    """Write every figure as PNG under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_loss_vs_compute(table, law, out / "loss_vs_compute.png"),
        plot_isoflop(table, law, out / "isoflop.png"),
        plot_phi_bootstrap(law, out / "phi_bootstrap.png"),
        plot_residuals(table, law, out / "residuals.png"),
    ]


def plot_depth_curves(points, fits: dict, path: str | Path) -> Path:
    """Test-time depth: held-out loss vs evaluation r, one panel per (variant, trained r), each run's points with
    its fitted saturating exponential; `points` is analysis.depth.load_depths' table, `fits` fit_runs' dict."""
    plt = _pyplot()
    panels = list(points.groupby(["variant", "trained_r"], sort=True))
    cols = min(4, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax, ((variant, trained_r), panel) in zip(axes.flat, panels):
        runs = list(panel.groupby("run_id", sort=False))
        for (run_id, g), color in zip(runs, _colors(range(len(runs))).values()):
            fit = fits[run_id]
            first = g.iloc[0]
            ax.scatter(g["eval_r"], g["val_loss"], s=16, color=color,
                       label=f"d={first['d_model']} C={first['compute']:.2g}")
            grid = np.linspace(1, g["eval_r"].max(), 200)
            ax.plot(grid, fit.predict(grid), color=color, lw=1.2)
        ax.axvline(trained_r, color="k", ls=":", lw=1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{variant + ': ' if variant else ''}trained r={trained_r}")
        ax.set_xlabel("recurrences at evaluation")
        ax.set_ylabel("validation loss (nats)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, path)


def plot_evals(table, path: str | Path, *, x_label: str) -> Path:
    """Downstream metric per task (one row of panels each): left, at each run's trained r against its effective
    parameters, one colour per r (do runs of equal N_eff score alike whatever their r?); right, against the
    test-time r, one line per looped run (what do more or fewer recurrences buy?). `table` is
    analysis.eval_report.eval_table's; dashed: chance."""
    plt = _pyplot()
    tasks = sorted(table["task"].unique())
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.8 * len(tasks)), squeeze=False)
    colors = _colors(table["r"].unique())
    depth_columns = sorted((c for c in table.columns if c.startswith("r'=")), key=lambda c: int(c[3:]))
    for (left, right), task in zip(axes, tasks):
        t = table[table["task"] == task]
        metric = t["metric"].iloc[0]
        for r, g in t.groupby("r", sort=True):
            left.errorbar(g["n_eff"], g["at_trained_r"], yerr=g["stderr"], fmt="o", ms=5, capsize=2,
                          color=colors[r], label=f"r={r}")
        for row in t.itertuples():
            values = t.loc[row.Index, depth_columns]
            seen = values.notna().to_numpy()
            depths = np.array([int(c[3:]) for c in depth_columns])[seen]
            style = {"color": colors[row.r], "alpha": 0.7, "ms": 4}
            right.plot(depths, values.to_numpy(float)[seen], "-o" if len(depths) > 1 else "o", lw=1, **style)
            if row.r in depths:
                right.plot([row.r], [row.at_trained_r], "s", mfc="none", mew=1.2, ms=8, color=colors[row.r])
        for ax in (left, right):
            chance = t["chance"].mean()
            if math.isfinite(chance):
                ax.axhline(chance, color="k", ls="--", lw=0.8)
            ax.set_ylabel(f"{task}: {metric}")
        left.set_xscale("log")
        left.set_xlabel(x_label)
        left.legend(fontsize=7, title="trained", title_fontsize=7)
        right.set_xticks([int(c[3:]) for c in depth_columns if t[c].notna().any()])
        right.set_xlabel("recurrences at evaluation r' (square: the trained r)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, path)
