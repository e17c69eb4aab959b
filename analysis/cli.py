"""`python -m analysis fit|query|plot|depth|plan`: fit a law from a store or table, query a saved law, draw figures,
fit each looped run's test-time depth curve, and price a sweep spec's grid before it runs."""

from __future__ import annotations

import argparse
import json
import sys

from . import engine
from .data import load_runs
from .fit import fit_law
from .law import ScalingLaw


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", help="fit only runs of this variant (required when the store mixes variants)")
    p.add_argument("--exclude-highest-loss", type=int, default=0, metavar="K",
                   help="drop the K highest-loss runs (Epoch's Chinchilla handling uses 5)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit the scaling law to finished runs and save it as JSON",
                         description="Fit L = E + A*(N_once + r^phi*N_rec)^-alpha + B*D^-beta (or the dense form) "
                                     "to a results store (folder or pyarrow.fs URI), or a .parquet/.csv table.")
    fit.add_argument("source", help="results store folder/URI, or a .parquet/.csv file")
    fit.add_argument("--out", required=True, help="where to write the law (JSON)")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default 1000)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--form", choices=("auto", "looped", "dense"), default="auto",
                     help="looped (with phi), dense (phi absent, N = N_once + N_rec), auto: dense iff all r = 1")
    fit.add_argument("--baseline", help="a saved law: refit only phi against it (a probe, e.g. truncated backprop)")
    fit.add_argument("--n-starts", type=int, default=engine.DEFAULT_N_STARTS,
                     help="L-BFGS-B starts taken from the screened grid (0 = every grid point)")
    fit.add_argument("--jobs", type=int, default=None, help="processes for the bootstrap (default: all CPUs)")
    fit.add_argument("--no-extrapolation", action="store_true", help="skip the leave-one-budget-out error")
    _add_selection(fit)

    query = sub.add_parser("query", help="ask a saved law a question",
                           description="Queries print JSON; add --ci for bootstrap intervals (needs a fitted law).")
    query.add_argument("law", help="law JSON written by `fit` (or `reference` for the published law)")
    qsub = query.add_subparsers(dest="query", required=True)

    def design_args(p, tokens: bool):
        p.add_argument("--n-once", type=float, required=True, help="parameters used once (prelude + coda)")
        p.add_argument("--n-rec", type=float, required=True, help="parameters of the recurrent block")
        p.add_argument("--r", type=float, required=True, help="recurrences")
        if tokens:
            p.add_argument("--tokens", type=float, required=True, help="training tokens D")
        p.add_argument("--ci", action="store_true", help="add the bootstrap 95%% interval")

    design_args(qsub.add_parser("predict", help="predicted loss (nats)"), tokens=True)
    design_args(qsub.add_parser("effective", aliases=["dense-equivalent"], help="effective parameters N_once + "
                                "r^phi*N_rec, which is also the size of the equal-loss plain (r=1) model"), tokens=False)
    opt = qsub.add_parser("optimal", help="budget-optimal r, width and tokens for a FLOP budget")
    opt.add_argument("--compute", type=float, required=True, help="training FLOP budget C")
    opt.add_argument("--r-values", default="1,2,4,8", help="comma-separated r to consider (default 1,2,4,8)")
    opt.add_argument("--max-unique-params", type=float, default=None)
    opt.add_argument("--max-inference-flops", type=float, default=None, help="cap on forward FLOPs per token")
    opt.add_argument("--family", default="reference", help="model family for the accounting (default reference)")

    plot = sub.add_parser("plot", help="write PNG figures of the fit",
                          description="Loss vs compute per r, IsoFLOP profiles, phi's bootstrap, residuals.")
    plot.add_argument("source", help="results store folder/URI, or a .parquet/.csv file")
    plot.add_argument("--out", required=True, help="folder for the PNGs")
    plot.add_argument("--law", help="saved law JSON (default: fit one now)")
    plot.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples when fitting here")
    plot.add_argument("--form", choices=("auto", "looped", "dense"), default="auto")
    _add_selection(plot)

    depth = sub.add_parser("depth", help="test-time depth: loss vs evaluation r per run, saturating-exponential fit",
                           description="Print one line per looped run: its loss at the trained and largest evaluated "
                                       "r, the gain between them, and the fit L(r) = asymptote + amplitude * "
                                       "exp(-rate * r) (Parcae's form) with bootstrap intervals.")
    depth.add_argument("source", help="results store folder/URI (its depths/ tables)")
    depth.add_argument("--plot", help="write the figure (val loss vs eval r, fitted curves) to this PNG")
    depth.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for intervals (default 200)")
    depth.add_argument("--seed", type=int, default=0)
    depth.add_argument("--variant", help="only runs of this variant")

    plan = sub.add_parser("plan", help="predict how precisely a sweep spec's grid pins phi, before it runs",
                          description="Predicted sd and 95%% half-width of phi, alpha, beta for the spec's grid "
                                      "(Fisher information of the law at a prior), total FLOPs, each cell's "
                                      "information per FLOP.")
    plan.add_argument("spec", help="sweep spec YAML (e.g. tuning/configs/reference.yaml)")
    plan.add_argument("--noise", type=float, default=0.01, help="log-normal loss noise, sd of log loss (default 0.01)")
    plan.add_argument("--law", default="reference", help="prior law: `reference` (published) or a law JSON")
    plan.add_argument("--suggest", action="store_true",
                      help="also a greedy grid with the same FLOPs (smaller interval) and one with the same interval")
    plan.add_argument("--simulate", type=int, default=0, metavar="N",
                      help="fit N noisy sweeps drawn from the prior with the real fitter; measured sd and coverage")
    plan.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    plan.add_argument("--jobs", type=int, default=None, help="processes for --simulate (default: all CPUs)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (every cell) instead of text")
    return parser


def _load_law(spec: str) -> ScalingLaw:
    return ScalingLaw.reference() if spec == "reference" else ScalingLaw.load(spec)


def _estimate_json(value) -> dict:
    if isinstance(value, tuple):  # Estimate
        return {"value": value.value, "low": value.low, "high": value.high}
    return {"value": value}


def _cmd_fit(a) -> dict:
    baseline = _load_law(a.baseline) if a.baseline else None
    law = fit_law(a.source, bootstrap=a.bootstrap, seed=a.seed, form=a.form, variant=a.variant, baseline=baseline,
                  exclude_highest_loss=a.exclude_highest_loss, n_starts=a.n_starts or None, n_jobs=a.jobs,
                  extrapolation=not a.no_extrapolation)
    law.save(a.out)
    print(law.summary(), file=sys.stderr)
    return {"out": str(a.out), "form": law.form, "coefficients": law.coefficients, "r2": law.r2, "n_runs": law.n_runs,
            "ci": {k: list(v) for k, v in law.ci.items()}, "extrapolation_error": law.extrapolation_error,
            "excluded": len(law.excluded),
            "quarantined": {e["run"]: e["quarantined"] for e in law.excluded if e.get("quarantined")}}


def _cmd_query(a) -> dict:
    law = _load_law(a.law)
    if a.query == "optimal":
        r_values = tuple(int(x) for x in a.r_values.split(",") if x.strip())
        return law.optimal(a.compute, r_values=r_values, max_unique_params=a.max_unique_params,
                           max_inference_flops_per_token=a.max_inference_flops, family=a.family).to_dict()
    args = (a.n_once, a.n_rec, a.r)
    if a.query == "predict":
        value = law.predict(*args, a.tokens, ci=a.ci)
    else:  # effective, or its alias dense-equivalent
        value = law.effective_params(*args, ci=a.ci)
    return {"query": a.query, **_estimate_json(value)}


def _cmd_plot(a) -> dict:
    from .plots import plot_all

    table = load_runs(a.source, variant=a.variant, exclude_highest_loss=a.exclude_highest_loss)
    law = _load_law(a.law) if a.law else fit_law(table, bootstrap=a.bootstrap, form=a.form)
    return {"figures": [str(p) for p in plot_all(table, law, a.out)]}


def _cmd_depth(a) -> str:
    from .depth import curves_table, fit_runs, format_curves, load_depths

    points = load_depths(a.source, variant=a.variant)
    fits = fit_runs(points, bootstrap=a.bootstrap, seed=a.seed)
    text = format_curves(curves_table(points, fits))
    if a.plot:
        from .plots import plot_depth_curves

        text += f"\nplot: {plot_depth_curves(points, fits, a.plot)}"
    return text

def _cmd_plan(a) -> dict | str:
    from .sweep_plan import plan_spec, render

    plan = plan_spec(a.spec, _load_law(a.law), a.noise, suggest=a.suggest, simulate=a.simulate, seed=a.seed,
                     n_jobs=a.jobs)
    return plan if a.json else render(plan)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        result = {"fit": _cmd_fit, "query": _cmd_query, "plot": _cmd_plot, "depth": _cmd_depth,
                  "plan": _cmd_plan}[a.command](a)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(result, indent=1, default=str))
    return 0
