"""`python -m analysis fit|compare|query|plot|depth|eval|lmeval`: fit a law from a store or table, compare a
variant's phi with the baseline's (one joint fit), query a saved law, draw figures, fit each looped run's test-time
depth curve, and measure the runs' downstream accuracy with lm-evaluation-harness (the `eval` extra). Pricing a sweep
spec before it runs expands the spec, which is the sweep layer's job: `python -m tuning.plan SPEC`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from training.storage import is_uri

from . import engine
from .data import load_runs
from .fit import fit_law
from .law import ScalingLaw, describe_models
from .optimal import compact, describe_extrapolation, design_counts, format_table


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", help="fit only runs of this variant (required when the store mixes variants)")
    p.add_argument("--exclude-highest-loss", type=int, default=0, metavar="K",
                   help="drop the K highest-loss runs (Epoch's Chinchilla handling uses 5)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="fit runs that differ in model family, injection, head_dim, vocab_size, seq_len or optimizer "
                        "(refused otherwise)")


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
    fit.add_argument("--baseline", metavar="LAW_JSON",
                     help="a saved law: refit only phi against it (a probe, e.g. truncated backprop), every other "
                          "coefficient frozen at the law's point estimate. Its phi interval ignores the baseline's "
                          "own uncertainty: E, A, alpha, B, beta are taken as exact and the baseline phi's own error "
                          "is left out, so it is too narrow for judging a difference of phis. `python -m analysis "
                          "compare STORE --variant X` fits both variants jointly and states delta phi with intervals "
                          "that carry both")
    fit.add_argument("--n-starts", type=int, default=engine.DEFAULT_N_STARTS,
                     help="L-BFGS-B starts taken from the screened grid (0 = every grid point)")
    fit.add_argument("--jobs", type=int, default=None, help="processes for the bootstrap (default: all CPUs)")
    fit.add_argument("--no-extrapolation", action="store_true", help="skip the leave-one-budget-out error")
    _add_selection(fit)

    cmp = sub.add_parser("compare", help="delta phi = phi_variant - phi_baseline with intervals, from one joint fit",
                         description="Fit the baseline's and the variant's runs jointly: E, A, alpha, B, beta shared, "
                                     "one phi per variant. Prints phi of each, delta phi = phi_variant - phi_baseline "
                                     "with 95% intervals from a bootstrap (runs resampled within each variant) and "
                                     "from the profile likelihood, the runs of each, and whether the data can tell "
                                     "the two apart (every delta phi interval excludes 0). Unlike `fit --baseline`, "
                                     "the intervals carry the baseline's own uncertainty.")
    cmp.add_argument("source", help="results store folder/URI, or a .parquet/.csv file, holding both variants")
    cmp.add_argument("--variant", required=True, help="the variant to compare (e.g. truncated, hyperconnect)")
    cmp.add_argument("--baseline", default="baseline", help="the variant to compare against (default: baseline)")
    cmp.add_argument("--bootstrap", type=int, default=1000,
                     help="bootstrap resamples, drawn within each variant (default 1000; 0 = profile intervals only)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--no-profile", action="store_true", help="skip the profile-likelihood intervals")
    cmp.add_argument("--jobs", type=int, default=None, help="processes for the bootstrap (default: all CPUs)")
    cmp.add_argument("--exclude-highest-loss", type=int, default=0, metavar="K",
                     help="drop each variant's K highest-loss runs")
    cmp.add_argument("--allow-mixed", action="store_true",
                     help="fit variants that differ in family, vocab_size, seq_len or head_dim (refused otherwise)")
    cmp.add_argument("--out", help="also write the comparison as JSON to this file")
    cmp.add_argument("--json", action="store_true", help="print JSON instead of the table")

    query = sub.add_parser("query", help="ask a saved law a question",
                           description="Queries print a table (add --json for JSON); --ci adds bootstrap intervals "
                                       "(needs a fitted law). A law answers in the model family it was fitted on and "
                                       "says how far a question lies outside what it was fitted on.")
    query.add_argument("law", help="law JSON written by `fit` (or `reference` for the published law)")
    qsub = query.add_subparsers(dest="query", required=True)

    def design_args(p, tokens: bool):
        p.add_argument("--n-once", type=float, help="parameters used once (prelude + coda)")
        p.add_argument("--n-rec", type=float, help="parameters of the recurrent block")
        p.add_argument("--width", type=int, help="instead of --n-once/--n-rec: a member of the law's fitted family "
                                                  "(d_model for tiny, size s for reference), counted exactly")
        p.add_argument("--r", type=float, required=True, help="recurrences")
        if tokens:
            p.add_argument("--tokens", type=float, required=True, help="training tokens D")
        p.add_argument("--ci", action="store_true", help="add the bootstrap 95%% interval")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    design_args(qsub.add_parser("predict", help="predicted loss (nats)"), tokens=True)
    design_args(qsub.add_parser("effective", aliases=["dense-equivalent"], help="effective parameters N_once + "
                                "r^phi*N_rec, which is also the size of the equal-loss plain (r=1) model"), tokens=False)
    opt = qsub.add_parser("optimal", help="budget-optimal r, width and tokens for a FLOP budget")
    opt.add_argument("--compute", type=float, required=True, help="training FLOP budget C")
    opt.add_argument("--r-values", default=None,
                     help="comma-separated r to consider (default: the r values the law was fitted on; 1,2,4,8 for a "
                          "law that does not record them)")
    opt.add_argument("--max-unique-params", type=float, default=None)
    opt.add_argument("--max-inference-flops", type=float, default=None, help="cap on forward FLOPs per token")
    opt.add_argument("--family", default=None, choices=("reference", "tiny"),
                     help="model family for the accounting (default: the family the law was fitted on)")
    opt.add_argument("--widths", default=None,
                     help="comma-separated widths to search (tiny: d_model; reference: size s); default: a range "
                          "around the fitted widths")
    opt.add_argument("--json", action="store_true", help="print JSON instead of a table")

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

    ev = sub.add_parser("eval", help="downstream accuracy of the runs at test-time depths (lm-evaluation-harness)",
                        description="Evaluate every completed run of STORE (or --runs / --variant) on lm-eval tasks at "
                                    "each test-time depth, one Ray task per run (one GPU each where there are GPUs); "
                                    "rows go to STORE/evals/<run_id>.parquet, and a run x task x depth already there "
                                    "is skipped. Prints a table (the metric at each depth per run, with N_eff from "
                                    "the store's law) and writes a plot. Needs the eval extra: "
                                    "pip install -e '.[eval]'.")
    ev.add_argument("source", help="results store folder/URI")
    ev.add_argument("--tasks", required=True,
                    help="comma-separated lm-eval task names: the local kjv_cloze, kjv_order (no download), your own "
                         "(--include-path), or lm-eval's (they download from the Hugging Face Hub)")
    ev.add_argument("--depths", help="comma-separated test-time r values (default: each run's trained r); dense runs "
                                     "(r=1) are evaluated at r'=1 only")
    ev.add_argument("--runs", help="comma-separated run ids (default: every completed run)")
    ev.add_argument("--variant", help="only runs of this variant")
    ev.add_argument("--include-path", action="append", default=[], metavar="DIR",
                    help="a folder of your own lm-eval task YAMLs (repeatable)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--skip-missing", action="store_true",
                    help="leave out runs without stored final weights instead of refusing (runs stored before weights "
                         "were kept have none)")
    ev.add_argument("--metric", default="acc", help="the metric of the table and plot (default acc; a task without "
                                                   "it shows its first metric)")
    ev.add_argument("--law", help="law JSON whose phi gives N_eff (default STORE/law.json when there is one; `none`: "
                                  "unique parameters)")
    ev.add_argument("--plot", help="PNG to write (default STORE/plots/evals.png for a local store)")

    lme = sub.add_parser("lmeval", help="lm-eval's own command line, with the looplaw model registered",
                         description="lm-evaluation-harness's command (lm-eval run ...) with `--model looplaw` known "
                                     "and the local tasks found: python -m analysis lmeval --model looplaw "
                                     "--model_args run=STORE/RUN_ID,r=4 --tasks kjv_cloze. Everything after "
                                     "`lmeval` goes to lm-eval.")
    lme.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments (main hands them over unparsed)")
    return parser


def load_law(spec: str) -> ScalingLaw:
    """`reference` (the published law) or a law JSON."""
    return ScalingLaw.reference() if spec == "reference" else ScalingLaw.load(spec)


def _estimate_json(value) -> dict:
    if isinstance(value, tuple):  # Estimate
        return {"value": value.value, "low": value.low, "high": value.high}
    return {"value": value}


def _cmd_fit(a) -> dict:
    baseline = load_law(a.baseline) if a.baseline else None
    law = fit_law(a.source, bootstrap=a.bootstrap, seed=a.seed, form=a.form, variant=a.variant, baseline=baseline,
                  exclude_highest_loss=a.exclude_highest_loss, n_starts=a.n_starts or None, n_jobs=a.jobs,
                  extrapolation=not a.no_extrapolation, allow_mixed=a.allow_mixed)
    law.save(a.out)
    print(law.summary(), file=sys.stderr)
    return {"out": str(a.out), "form": law.form, "coefficients": law.coefficients, "r2": law.r2, "n_runs": law.n_runs,
            "ci": {k: list(v) for k, v in law.ci.items()}, "extrapolation_error": law.extrapolation_error,
            "excluded": len(law.excluded),
            "quarantined": {e["run"]: e["quarantined"] for e in law.excluded if e.get("quarantined")},
            "variant": law.meta.get("variant"), "models": law.models, "notes": law.meta.get("notes", []),
            "warning": law.meta.get("warning"), "loops": law.meta.get("loops"),
            "residual_by_r": law.meta.get("residual_by_r")}


def _cmd_compare(a) -> dict | str:
    from .compare import compare

    result = compare(a.source, a.variant, baseline=a.baseline, bootstrap=a.bootstrap, seed=a.seed,
                     profile=not a.no_profile, exclude_highest_loss=a.exclude_highest_loss, n_jobs=a.jobs,
                     allow_mixed=a.allow_mixed)
    if a.out:
        result.save(a.out)
    if a.json:
        return result.to_dict()
    return str(result) + (f"\nwritten: {a.out}" if a.out else "")


def _ints(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(x) for x in text.split(",") if x.strip())


def _design_query(law: ScalingLaw, a) -> dict:
    """A predict/effective query as JSON: the value (and interval), the design it was asked of, the extrapolation."""
    design = {}
    if a.width is not None:
        if a.n_once is not None or a.n_rec is not None:
            raise ValueError("give either --width or --n-once/--n-rec, not both")
        if not float(a.r).is_integer():
            raise ValueError(f"r: must be an integer to build a family member of width {a.width}, got {a.r:g}")
        counts = design_counts(law, a.width, int(a.r))
        design = {"family": counts["family"], "width": a.width, "d_model": counts["d_model"],
                  "n_once": counts["n_once"], "n_rec": counts["n_rec"]}
        n_once, n_rec, notes = counts["n_once"], counts["n_rec"], counts["notes"]
    elif a.n_once is None or a.n_rec is None:
        raise ValueError("give --n-once and --n-rec (parameter counts), or --width (a member of the law's family)")
    else:
        n_once, n_rec, notes = a.n_once, a.n_rec, []
    args = (n_once, n_rec, a.r)
    tokens = getattr(a, "tokens", None)
    if a.query == "predict":
        value = law.predict(*args, tokens, ci=a.ci)
    else:  # effective, or its alias dense-equivalent
        value = law.effective_params(*args, ci=a.ci)
    ex = law.extrapolation(n_once=n_once, n_rec=n_rec, r=a.r, tokens=tokens,
                           width=design.get("d_model") if design.get("family") == law.models.get("family") else None)
    return {"query": a.query, **_estimate_json(value), "n_once": n_once, "n_rec": n_rec, "r": a.r,
            **({"tokens": tokens} if tokens is not None else {}), **({"design": design} if design else {}),
            "extrapolation": ex, "notes": notes}


def _design_text(law: ScalingLaw, q: dict) -> str:
    label = "predicted loss (nats)" if q["query"] == "predict" else "effective params (= dense-equivalent size)"
    header = (["width"] if "design" in q else []) + ["n_once", "n_rec", "r"] + (["tokens"] if "tokens" in q else []) \
        + [label] + (["95% CI"] if "low" in q else []) + ["extrapolates"]
    value = f"{q['value']:.4f}" if q["query"] == "predict" else compact(q["value"])
    ci = []
    if "low" in q:
        ci = ["-" if q["low"] is None else (f"[{q['low']:.4f}, {q['high']:.4f}]" if q["query"] == "predict"
                                            else f"[{compact(q['low'])}, {compact(q['high'])}]")]
    row = ([str(q["design"]["d_model"])] if "design" in q else []) + [compact(q["n_once"]), compact(q["n_rec"]),
                                                                       f"{q['r']:g}"] \
        + ([compact(q["tokens"])] if "tokens" in q else []) + [value] + ci \
        + [describe_extrapolation(q["extrapolation"])]
    lines = [f"law: {describe_models(law.models)}"]
    lines += format_table([row], header, right=set(range(len(header) - 1)))
    if q["extrapolation"]:
        lines.append("note: outside what the law was fitted on, the value is the law's guess, not a measurement")
    if law.models.get("family") == "unknown":
        lines.append("note: the law does not record which models it was fitted on; nothing is checked for "
                     "extrapolation")
    lines += [f"note: {n}" for n in q["notes"]]
    return "\n".join(lines)


def _cmd_query(a) -> dict | str:
    law = load_law(a.law)
    if a.query == "optimal":
        opt = law.optimal(a.compute, r_values=_ints(a.r_values), max_unique_params=a.max_unique_params,
                          max_inference_flops_per_token=a.max_inference_flops, family=a.family, sizes=_ints(a.widths))
        return opt.to_dict() if a.json else str(opt)
    q = _design_query(law, a)
    if not a.ci:
        for k in ("low", "high"):
            q.pop(k, None)
    return q if a.json else _design_text(law, q)


def _cmd_plot(a) -> dict:
    from .plots import plot_all

    table = load_runs(a.source, variant=a.variant, exclude_highest_loss=a.exclude_highest_loss)
    law = load_law(a.law) if a.law else fit_law(table, bootstrap=a.bootstrap, form=a.form, allow_mixed=a.allow_mixed)
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

def _require_eval_extra() -> None:
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: `eval` and `lmeval` need the eval extra, "
                         "pip install -e '.[eval]' (lm-eval 0.4.13)") from None


def _eval_law(a) -> tuple[ScalingLaw | None, str, str]:
    """The law whose phi prices each run (N_eff), what N_eff then is (the plot's axis) and where phi comes from."""
    path = a.law
    if path is None:
        default = os.path.join(a.source, "law.json")
        path = default if os.path.isfile(default) else "none"
    if path == "none":
        return None, "unique parameters N_once + N_rec", "no law"
    law = load_law(path)
    if law.phi is None:
        return law, "unique parameters N_once + N_rec", f"dense law {path}"
    return law, f"effective parameters N_once + r^{law.phi:.2f} N_rec", f"phi from {path}"


class CommandFailed(Exception):
    """A command that ran to its end with failures: its report, then exit status 1."""


def _cmd_eval(a) -> str:
    _require_eval_extra()
    # lm-eval, torch and Ray load only for this command (2.3-2.7 s more start-up here: importing analysis.downstream
    # took 3.4-3.7 s against 1.1 s for analysis.cli), and only where the eval extra is installed.
    from .downstream import EvalSpec, evaluate_store
    from .eval_report import eval_table, format_eval_table, load_evals
    from .plots import plot_evals

    law, axis, source = _eval_law(a)
    try:
        depths = _ints(a.depths)
    except ValueError:
        raise ValueError(f"depths: {a.depths!r} is not a comma-separated list of integers; e.g. --depths 1,2,4,8") \
            from None
    spec = EvalSpec(store=a.source, tasks=tuple(a.tasks.split(",")), depths=depths,
                    runs=None if a.runs is None else tuple(a.runs.split(",")), variant=a.variant,
                    include_path=tuple(a.include_path), num_fewshot=a.num_fewshot, limit=a.limit,
                    batch_size=a.batch_size, skip_missing=a.skip_missing)
    outcome = evaluate_store(spec, echo=lambda line: print(line, file=sys.stderr, flush=True))
    points = load_evals(spec.store, tasks=spec.tasks, run_ids=outcome.run_ids, num_fewshot=spec.num_fewshot,
                        limit=spec.limit, law=law)
    table = eval_table(points, a.metric)
    lines = [format_eval_table(table, law_note=f"N_eff: {axis}, {source}")]
    plot = a.plot or (None if is_uri(spec.store) else os.path.join(spec.store, "plots", "evals.png"))
    if plot and not table.empty:
        lines.append(f"plot: {plot_evals(table, plot, x_label=axis)}")
    lines.append(f"evaluated {len(outcome.evaluated)} runs in {outcome.seconds:.0f} s; {len(outcome.up_to_date)} were "
                 "up to date" + (f"; left out without weights: {', '.join(outcome.no_weights)}"
                                 if outcome.no_weights else ""))
    if outcome.failed:
        raise CommandFailed("\n".join(lines + [f"failed: {run}: {why}" for run, why in outcome.failed.items()]))
    return "\n".join(lines)


def _cmd_lmeval(args: list[str]) -> int:
    _require_eval_extra()
    from lm_eval.__main__ import cli_evaluate

    from . import lm_model  # noqa: F401  (registers `looplaw`: lm-eval's command finds no third-party model itself)
    from .eval_tasks import TASKS_DIR

    args = list(args)
    if not any(arg.startswith("--include_path") for arg in args):
        args += ["--include_path", str(TASKS_DIR)]  # the local tasks, when the user names no folder of their own
    before, sys.argv = sys.argv, ["lm-eval", *args]  # lm-eval's command reads sys.argv, as its console script
    try:
        cli_evaluate()
    finally:
        sys.argv = before
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lmeval"]:  # lm-eval parses its own options (argparse would claim those it does not know)
        try:
            return _cmd_lmeval(argv[1:])
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    a = _parser().parse_args(argv)
    try:
        result = {"fit": _cmd_fit, "compare": _cmd_compare, "query": _cmd_query, "plot": _cmd_plot, "depth": _cmd_depth,
                  "eval": _cmd_eval}[a.command](a)
    except CommandFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(result, indent=1, default=str))
    return 0
