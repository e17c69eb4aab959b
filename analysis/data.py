"""Reading runs into one normalised table: a results store, a Parquet/CSV file, a pyarrow Table or a DataFrame.

Normalised columns: run (a label for messages), n_once, n_rec, r, tokens, val_loss, compute, budget
(plus whatever else the source had). Only `completed` runs are fitted; every other row is kept in
`excluded` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from training import results_store
from training.storage import filesystem

REQUIRED = ("n_once", "n_rec", "r", "tokens", "val_loss")
# tuning.grid's extra-seed copies of a baseline cell: they measure seed noise (analysis.loops), never a fit variant.
SEED_NOISE_VARIANT = "seed_noise"

# Column names other tables use for the same quantities (Epoch's Chinchilla CSV among them).
ALIASES: dict[str, str] = {
    "Model Size": "params",
    "N": "params",
    "n": "params",
    "n_params": "params",
    "Training FLOP": "compute",
    "C": "compute",
    "flops": "compute",
    "Training Tokens": "tokens",
    "D": "tokens",
    "loss": "val_loss",
    "Loss": "val_loss",
}


@dataclass
class RunTable:
    frame: pd.DataFrame  # runs that enter the fit, normalised columns
    excluded: list[dict[str, Any]] = field(default_factory=list)  # {"run": ..., "reason": ...}
    budget_labels: dict[Any, str] = field(default_factory=dict)
    variant: str | None = None  # the variant fitted (given, or the only one besides seed-noise replicates)
    notes: list[str] = field(default_factory=list)  # what the reader decided on its own, said to the user

    def __len__(self) -> int:
        return len(self.frame)


def _read_source(source: Any) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows, and the store's quarantined run files as excluded entries (named, with the reason)."""
    if isinstance(source, pd.DataFrame):
        return source.copy(), []
    if isinstance(source, pa.Table):
        return source.to_pandas(), []
    if isinstance(source, RunTable):
        return source.frame.copy(), []
    if not isinstance(source, (str, Path)):
        raise TypeError(f"results must be a store path/URI, a .parquet/.csv file, a pyarrow.Table or a "
                        f"pandas.DataFrame, got {type(source).__name__}")
    text = str(source)
    fs, path = filesystem(text)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"results source {text!r} does not exist")
    if info.type == pafs.FileType.File:
        return _read_file(fs, path), []
    if fs.get_file_info(path.rstrip("/") + "/runs").type == pafs.FileType.Directory:
        table = results_store.read_runs(text)
        bad = [{"run": q.file, "reason": f"unreadable run file, moved to {q.moved_to}: {q.reason}",
                "quarantined": q.moved_to} for q in results_store.quarantined(text)]
        if table.num_rows == 0 and not bad:
            raise ValueError(f"no .parquet or .csv files under {path}/runs: the results store {text!r} has no runs yet")
        return table.to_pandas(), bad
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith((".parquet", ".csv"))
                   and not Path(f.path).name.startswith((".", "_")))
    if not files:
        raise ValueError(f"no .parquet or .csv files under {path!r}: is {text!r} a results store "
                         f"(STORE/runs/<run_id>.parquet)?")
    # A folder of tables written by different tools maybe: concatenating frames tolerates schemas that differ
    # in optional columns (a null `size` in one file, an int in another).
    return pd.concat([_read_file(fs, f) for f in files], ignore_index=True), []


def _read_file(fs: pafs.FileSystem, path: str) -> pd.DataFrame:
    with fs.open_input_file(path) as f:
        if path.endswith(".csv"):
            return pacsv.read_csv(f).to_pandas()
        return pq.read_table(f).to_pandas()


def _normalise_columns(df: pd.DataFrame) -> pd.DataFrame:
    rename = {c: ALIASES[c] for c in df.columns if c in ALIASES and ALIASES[c] not in df.columns}
    df = df.rename(columns=rename)
    if "params" in df.columns and "n_once" not in df.columns:
        # A dense table: every parameter is used once.
        df["n_once"] = df["params"]
        if "n_rec" not in df.columns:
            df["n_rec"] = 0
        if "r" not in df.columns:
            df["r"] = 1
    if "tokens" not in df.columns and "compute" in df.columns and "n_once" in df.columns and "n_rec" in df.columns:
        # Chinchilla / Epoch convention D = C / (6 N); only for tables that give no token count.
        r = df["r"] if "r" in df.columns else 1
        df["tokens"] = df["compute"] / (6.0 * (df["n_once"] + r * df["n_rec"]))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"results are missing column(s) {missing}; need {list(REQUIRED)} (a dense table may give "
            f"`params`/`n`/`Model Size` instead of n_once/n_rec/r, and `compute`/`Training FLOP` instead of "
            f"tokens, with D = C/(6N)); columns present: {list(df.columns)}")
    return df


def _run_labels(df: pd.DataFrame) -> pd.Series:
    if "run_id" in df.columns:
        ids = df["run_id"].astype(str)
        if "name" in df.columns:  # training's readable name beside its content-hash id
            named = df["name"].notna() & (df["name"].astype(str) != "")
            return ids.where(~named, df["name"].astype(str) + " [" + ids + "]")
        return ids
    return pd.Series([f"row {i}" for i in range(len(df))], index=df.index)


def _check_values(df: pd.DataFrame) -> None:
    rules = {
        "n_once": (lambda x: x >= 0, ">= 0"),  # 0: a model given as all-recurrent
        "n_rec": (lambda x: x >= 0, ">= 0"),
        "r": (lambda x: x >= 1, ">= 1"),
        "tokens": (lambda x: x > 0, "> 0"),
        "val_loss": (lambda x: x > 0, "> 0"),
    }
    problems = []
    for col, (ok, want) in rules.items():
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = ~(np.isfinite(values) & ok(values))
        if bad.any():
            shown = ", ".join(f"{run}={v!r}" for run, v in zip(df.loc[bad, "run"].head(10), df.loc[bad, col].head(10)))
            more = f" (and {int(bad.sum()) - 10} more)" if bad.sum() > 10 else ""
            problems.append(f"{col} must be finite and {want}: {shown}{more}")
    empty = pd.to_numeric(df["n_once"], errors="coerce") + pd.to_numeric(df["n_rec"], errors="coerce") <= 0
    if empty.any():
        problems.append(f"n_once + n_rec must be > 0: {', '.join(df.loc[empty, 'run'].head(10))}")
    if problems:
        raise ValueError("invalid values in completed runs; fix or drop these rows: " + "; ".join(problems))


def _compute(df: pd.DataFrame) -> pd.Series:
    if "compute" in df.columns and pd.to_numeric(df["compute"], errors="coerce").notna().all():
        return pd.to_numeric(df["compute"]).astype(float)
    if "flops_per_token" in df.columns and pd.to_numeric(df["flops_per_token"], errors="coerce").notna().all():
        return pd.to_numeric(df["flops_per_token"]).astype(float) * df["tokens"]
    # Without accounting, 6 FLOPs per parameter pass per token: used only to group budgets and plot.
    return 6.0 * (df["n_once"] + df["r"] * df["n_rec"]) * df["tokens"]


def _fmt_compute(c: float) -> str:
    return f"{c:.3g}".replace("e+", "e")


def budget_groups(compute: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Budget of each run: log10 compute rounded to the nearest third of a decade.

    Sweeps space budgets by ~1/3 decade (1, 2.15, 4.64 x 10^k; Chinchilla's 1, 3, 6 x 10^k), so each
    target lands in its own bucket, and a run a few percent off its target (integer step counts)
    stays in it.
    """
    compute = np.asarray(compute, dtype=float)
    groups = np.rint(3.0 * np.log10(compute)).astype(int)
    labels = {int(k): _fmt_compute(float(np.median(compute[groups == k]))) for k in np.unique(groups)}
    return groups, labels


def load_runs(source: Any, *, variant: str | None = None, exclude_highest_loss: int = 0) -> RunTable:
    """Read and validate runs; see the module docstring.

    variant: keep only rows of this `variant`; required when the table mixes variants (a law fitted
    across truncated-backprop and full-backprop runs would be meaningless). `seed_noise` rows (extra seeds of
    baseline cells, tuning.grid) are never a fit variant: beside one other variant they are left out, with a note
    in RunTable.notes, and that variant is fitted.
    exclude_highest_loss: drop the k completed runs with the highest loss (Epoch drops 5 on Chinchilla).
    """
    if int(exclude_highest_loss) != exclude_highest_loss or exclude_highest_loss < 0:
        raise ValueError(f"exclude_highest_loss must be a non-negative integer, got {exclude_highest_loss!r}")
    raw, excluded = _read_source(source)
    df = _normalise_columns(raw).reset_index(drop=True)
    df["run"] = _run_labels(df)

    notes: list[str] = []
    if "variant" in df.columns:
        present = sorted(df["variant"].dropna().astype(str).unique().tolist())
        if variant == SEED_NOISE_VARIANT:
            raise ValueError(f"variant={SEED_NOISE_VARIANT!r} is not a fit variant: its runs are extra seeds of "
                             f"baseline cells, kept to measure seed noise; fit the baseline variant")
        candidates = [v for v in present if v != SEED_NOISE_VARIANT]
        if variant is None and len(candidates) > 1:
            raise ValueError(f"the results mix variants {candidates}; choose one with variant=... "
                             f"(CLI: --variant), fit each separately, or fit a probe against a baseline law")
        if variant is None and len(candidates) == 1 and SEED_NOISE_VARIANT in present:
            variant = candidates[0]
        if variant is not None:
            if variant not in present:
                raise ValueError(f"variant={variant!r} has no runs; variants present: {present}")
            other = df["variant"].astype(str) != variant
            replicate = df["variant"].astype(str) == SEED_NOISE_VARIANT
            excluded += [{"run": run, "reason": (
                f"seed-noise replicate (not a fit variant; fitting {variant!r})" if v == SEED_NOISE_VARIANT
                else f"variant {v!r} (fitting {variant!r})")}
                for run, v in zip(df.loc[other, "run"], df.loc[other, "variant"])]
            if replicate.any():
                notes.append(f"left out {int(replicate.sum())} {SEED_NOISE_VARIANT} replicate run(s): extra seeds of "
                             f"baseline cells measure seed noise and are never fitted; fitted variant {variant!r}")
            df = df[~other]
    elif variant is not None:
        raise ValueError(f"variant={variant!r} given but the results have no `variant` column")

    if "status" in df.columns:
        done = df["status"].astype(str) == "completed"
        excluded += [{"run": run, "reason": f"status {s!r}"} for run, s in zip(df.loc[~done, "run"], df.loc[~done, "status"])]
        df = df[done]

    _check_values(df)
    df = df.astype({c: float for c in REQUIRED})

    if exclude_highest_loss:
        if exclude_highest_loss >= len(df):
            raise ValueError(f"exclude_highest_loss={exclude_highest_loss} would drop all {len(df)} runs")
        worst = df["val_loss"].nlargest(int(exclude_highest_loss)).index
        excluded += [{"run": run, "reason": f"among the {exclude_highest_loss} highest-loss runs (loss {loss:.4g})"}
                     for run, loss in zip(df.loc[worst, "run"], df.loc[worst, "val_loss"])]
        df = df.drop(index=worst)

    df = df.reset_index(drop=True)
    df["compute"] = _compute(df)
    # The sweep's own budget label wins; then the FLOP target training recorded; else bucket the compute.
    if "budget" not in df.columns and "budget_compute" in df.columns and len(df) and df["budget_compute"].notna().all():
        df["budget"] = df["budget_compute"].astype(float)
    if "budget" in df.columns and len(df) and df["budget"].notna().all():
        labels = {b: (_fmt_compute(float(b)) if isinstance(b, (int, float, np.number)) else str(b))
                  for b in df["budget"].unique()}
    elif len(df):
        groups, labels = budget_groups(df["compute"].to_numpy())
        df["budget"] = groups
    else:
        labels = {}
    return RunTable(frame=df, excluded=excluded, budget_labels=labels, variant=variant, notes=notes)


def load_epoch_chinchilla(path: str | Path, exclude_highest_loss: int = 0) -> RunTable:
    """Epoch AI's extraction of Chinchilla's runs (`Model Size`, `Training FLOP`, `loss`; D = C/(6N))."""
    df = pd.read_csv(path)
    missing = [c for c in ("Model Size", "Training FLOP", "loss") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks Epoch's column(s) {missing}")
    df = df[["Model Size", "Training FLOP", "loss"]].dropna()
    return load_runs(df, exclude_highest_loss=exclude_highest_loss)


# ---- which models the runs are ------------------------------------------------------------------------------------
# Model fields a row may carry as columns (the results-store schema) or in its `config` JSON's model section.
MODEL_FIELDS = ("size", "d_model", "n_prelude", "n_rec_layers", "n_coda", "r", "injection", "head_dim", "seq_len",
                "vocab_size", "hc_lanes", "bptt_k", "mlp_ratio")
# Fields every run of one law must share (a law across them fits the difference, not the scaling); `optimizer` is the
# recipe, from the config's optim section. Injection is compared over looped rows only: r = 1 runs have none.
MIX_FIELDS = ("family", "injection", "head_dim", "vocab_size", "seq_len", "optimizer")
# Built-in injections whose lanes (hc_lanes) are part of the model; other modes ignore the field.
LANE_INJECTIONS = ("hyperconnect", "hyperloop")


def _plain(value: Any) -> Any:
    """A cell as a plain Python value; None for nulls (None, NaN, pd.NA)."""
    if value is None or (np.ndim(value) == 0 and not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _config_sections(text: Any) -> tuple[dict, dict]:
    if not isinstance(text, str) or not text:
        return {}, {}
    try:
        cfg = json.loads(text)
    except ValueError:
        return {}, {}
    if not isinstance(cfg, dict):
        return {}, {}
    model, optim = cfg.get("model"), cfg.get("optim")
    return (model if isinstance(model, dict) else {}), (optim if isinstance(optim, dict) else {})


def model_rows(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per run: its model fields (MODEL_FIELDS), `family` and `optimizer`, from the `config` JSON's sections with the
    row's own columns taking precedence; None when the source describes no model (a bare n_once, n_rec, r, tokens,
    val_loss table).

    family: "reference" where the reference size s is recorded (the results store writes it only for that family),
    "tiny" for any other model with a width (the iso-depth family at CPU size), "unknown" otherwise.
    """
    if "config" not in frame.columns and not any(c in frame.columns for c in ("d_model", "size", "head_dim")):
        return None
    rows = []
    configs = frame["config"] if "config" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    for (_, row), text in zip(frame.iterrows(), configs):
        model, optim = _config_sections(text)
        out = {k: _plain(model.get(k)) for k in MODEL_FIELDS}
        for k in MODEL_FIELDS:
            if k in frame.columns and _plain(row[k]) is not None:
                out[k] = _plain(row[k])
        out["optimizer"] = _plain(optim.get("optimizer"))
        out["family"] = ("reference" if out["size"] is not None
                         else "tiny" if out["d_model"] is not None else "unknown")
        rows.append(out)
    return pd.DataFrame(rows, index=frame.index, columns=["family", *MODEL_FIELDS, "optimizer"], dtype=object)


def _distinct(values) -> list:
    return sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))


def mixed_models(models: pd.DataFrame | None) -> dict[str, list]:
    """The MIX_FIELDS whose runs differ, each with its distinct values (unrecorded values are not a difference)."""
    if models is None or models.empty:
        return {}
    looped = models["r"].map(lambda r: r is not None and r > 1)
    out = {}
    for name in MIX_FIELDS:
        col = models.loc[looped, name] if name == "injection" else models[name]
        values = _distinct(col)
        if len(values) > 1:
            out[name] = values
    return out


def _layout(models: pd.DataFrame, family: str) -> dict[str, int] | None:
    """The iso-depth rule prelude + (rec_depth / r) x r + coda, read off the looped runs (r = 1 runs hold every layer
    in one block, so they give only the total)."""
    looped = models[models["r"].map(lambda r: r is not None and r > 1)]
    layouts = Counter((p, n * r, c) for p, n, r, c in zip(looped["n_prelude"], looped["n_rec_layers"], looped["r"],
                                                          looped["n_coda"]) if None not in (p, n, r, c))
    if layouts:
        (p, depth, c), _ = layouts.most_common(1)[0]
        return {"n_prelude": int(p), "rec_depth": int(depth), "n_coda": int(c)}
    totals = Counter(n for n in models["n_rec_layers"] if n is not None)
    if not totals:
        return None
    edge = 2 if family == "reference" else 1  # the families' default prelude and coda
    total = int(totals.most_common(1)[0][0])
    return {"n_prelude": edge, "rec_depth": total - 2 * edge, "n_coda": edge} if total > 2 * edge else None


def _span(x) -> list[float] | None:
    x = pd.to_numeric(pd.Series(x), errors="coerce").astype(float).to_numpy()
    x = x[np.isfinite(x)]
    return [float(x.min()), float(x.max())] if len(x) else None


def describe_models(frame: pd.DataFrame) -> dict[str, Any]:
    """What a fit saw, for law.meta["models"]: family, vocab, seq_len, head_dim, injection, layout rule, r values,
    widths, and the compute, token and unique-parameter ranges; family "unknown" when the rows name no model.
    A field the runs disagree on is listed under "mixed" and left None."""
    out: dict[str, Any] = {"family": "unknown"}
    if len(frame):
        out["r_values"] = sorted({int(r) if float(r).is_integer() else float(r) for r in frame["r"]})
        out["compute"] = _span(frame["compute"]) if "compute" in frame.columns else None
        out["tokens"] = _span(frame["tokens"])
        out["unique_params"] = _span(frame["n_once"] + frame["n_rec"])
    models = model_rows(frame)
    if models is None or models.empty:
        return out
    mixed = mixed_models(models)
    looped = models[models["r"].map(lambda r: r is not None and r > 1)]

    def one(name, col=None):
        if name in mixed:
            return None
        values = _distinct(models[name] if col is None else col)
        return values[0] if values else None

    family = "mixed" if "family" in mixed else (one("family") or "unknown")
    injection = one("injection", looped["injection"])
    out.update({
        "family": family,
        "vocab_size": one("vocab_size"),
        "seq_len": one("seq_len"),
        "head_dim": one("head_dim"),
        "injection": injection,
        "hc_lanes": one("hc_lanes", looped["hc_lanes"]) if injection in LANE_INJECTIONS else None,
        "mlp_ratio": one("mlp_ratio"),
        "optimizer": one("optimizer"),
        "layout": _layout(models, family),
        "widths": [int(w) for w in _distinct(models["d_model"])],
    })
    if family == "reference":
        out["sizes"] = [int(s) for s in _distinct(models["size"])]
    if mixed:
        out["mixed"] = mixed
    return out
