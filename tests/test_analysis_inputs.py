"""Reading runs from every accepted source, and the clear errors for inputs a fit cannot use."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import ScalingLaw, fit_law, load_runs

LAW = ScalingLaw(E=1.6, A=28.0, alpha=0.2, B=900.0, beta=0.37, phi=0.5)


def _grid(r_values=(1, 2, 4), noise=0.0, seed=0):
    """A small looped grid (no models needed): sizes x token counts x r."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate((2e7, 5e7, 1e8, 2e8)):
        for d in (5e8, 1e9, 3e9):
            for r in r_values:
                n_once, n_rec = 0.25 * n, 0.75 * n / r
                loss = LAW.predict(n_once, n_rec, r, d) * np.exp(noise * rng.standard_normal())
                rows.append({"run_id": f"run-{i}-{d:.0e}-{r}", "n_once": n_once, "n_rec": n_rec, "r": r,
                             "tokens": d, "val_loss": loss, "status": "completed", "variant": "base",
                             "compute": 6 * (n_once + r * n_rec) * d})
    return pd.DataFrame(rows)


def test_dataframe_table_and_parquet_file_agree(tmp_path):
    df = _grid()
    pq.write_table(pa.Table.from_pandas(df), tmp_path / "runs.parquet")
    a, b, c = (load_runs(x).frame for x in (df, pa.Table.from_pandas(df), tmp_path / "runs.parquet"))
    for col in ("n_once", "n_rec", "r", "tokens", "val_loss"):
        np.testing.assert_allclose(a[col], b[col])
        np.testing.assert_allclose(a[col], c[col])


def test_store_folder_and_uri(tmp_path):
    df = _grid()
    runs = tmp_path / "store" / "runs"
    runs.mkdir(parents=True)
    for _, row in df.iterrows():
        pq.write_table(pa.Table.from_pandas(row.to_frame().T.infer_objects(), preserve_index=False),
                       runs / f"{row['run_id']}.parquet")
    by_path = load_runs(tmp_path / "store")
    by_uri = load_runs(f"file://{tmp_path / 'store'}")
    assert len(by_path) == len(by_uri) == len(df)
    assert sorted(by_path.frame["run"]) == sorted(df["run_id"])


def test_exact_law_is_recovered_on_noise_free_data():
    law = fit_law(_grid(), bootstrap=0, extrapolation=False)
    assert law.phi == pytest.approx(0.5, abs=1e-3)
    assert law.alpha == pytest.approx(0.2, abs=1e-3) and law.beta == pytest.approx(0.37, abs=1e-3)
    assert law.r2 == pytest.approx(1.0, abs=1e-6)


def test_only_completed_runs_enter_and_the_rest_are_listed():
    df = _grid()
    df.loc[0, "status"] = "diverged"
    df.loc[0, "val_loss"] = np.nan  # a diverged run may have no loss: it must not trip validation
    df.loc[1, "status"] = "failed"
    table = load_runs(df)
    assert len(table) == len(df) - 2
    reasons = {e["run"]: e["reason"] for e in table.excluded}
    assert "diverged" in reasons[df.loc[0, "run_id"]] and "failed" in reasons[df.loc[1, "run_id"]]
    law = fit_law(df, bootstrap=0, extrapolation=False)
    assert law.n_runs == len(df) - 2 and len(law.excluded) == 2


def test_exclude_highest_loss():
    df = _grid()
    table = load_runs(df, exclude_highest_loss=3)
    worst = set(df.nlargest(3, "val_loss")["run_id"])
    assert {e["run"] for e in table.excluded} == worst and len(table) == len(df) - 3


def test_missing_columns_are_named():
    df = _grid().drop(columns=["tokens", "compute", "r"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['r', 'tokens'\]"):
        load_runs(df)


@pytest.mark.parametrize("col,value,rule", [("val_loss", np.nan, "val_loss must be finite"),
                                            ("tokens", -1.0, "tokens must be finite and > 0"),
                                            ("n_once", -1.0, "n_once must be finite and >= 0"),
                                            ("r", 0, "r must be finite and >= 1")])
def test_bad_values_name_the_rows(col, value, rule):
    df = _grid()
    df.loc[[2, 5], col] = value
    with pytest.raises(ValueError, match=rule) as err:
        load_runs(df)
    assert df.loc[2, "run_id"] in str(err.value) and df.loc[5, "run_id"] in str(err.value)


def test_n_once_zero_is_a_model_given_as_all_recurrent():
    df = _grid()
    df.loc[[2, 5], "n_rec"] += df.loc[[2, 5], "n_once"] / df.loc[[2, 5], "r"] ** LAW.phi
    df.loc[[2, 5], "n_once"] = 0.0  # the same N_eff, written as all-recurrent
    assert len(load_runs(df)) == len(df)
    df.loc[3, ["n_once", "n_rec"]] = 0.0
    with pytest.raises(ValueError, match="n_once \\+ n_rec must be > 0") as err:
        load_runs(df)
    assert df.loc[3, "run_id"] in str(err.value)


def test_too_few_runs():
    with pytest.raises(ValueError, match="too few runs: 5 completed run"):
        fit_law(_grid().iloc[:5], bootstrap=0)


def test_single_r_value_is_not_identifiable():
    with pytest.raises(ValueError, match="phi is not identifiable: every run has r=4"):
        fit_law(_grid(r_values=(4,)), bootstrap=0)
    # ...but the dense form fits it, and a table with only r = 1 is dense automatically
    assert fit_law(_grid(r_values=(4,)), bootstrap=0, form="dense", extrapolation=False).form == "dense"
    assert fit_law(_grid(r_values=(1,)), bootstrap=0, extrapolation=False).form == "dense"


def test_mixed_variants_need_a_choice():
    df = pd.concat([_grid(), _grid().assign(variant="trunc", run_id=lambda x: x["run_id"] + "-t")])
    with pytest.raises(ValueError, match=r"mix variants \['base', 'trunc'\]"):
        load_runs(df)
    table = load_runs(df, variant="trunc")
    assert len(table) == len(df) // 2 and all("variant 'base'" in e["reason"] for e in table.excluded)
    with pytest.raises(ValueError, match="variant='nope' has no runs"):
        load_runs(df, variant="nope")


def test_dense_aliases_and_tokens_from_compute():
    df = pd.DataFrame({"Model Size": [1e8, 2e8], "Training FLOP": [6e18, 1.2e19], "loss": [3.0, 2.9]})
    f = load_runs(df).frame
    np.testing.assert_allclose(f["tokens"], [1e10, 1e10])
    assert (f["r"] == 1).all() and (f["n_rec"] == 0).all()


def test_unknown_source_type_and_missing_path(tmp_path):
    with pytest.raises(TypeError, match="results must be"):
        load_runs(42)
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path / "nowhere")
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .parquet or .csv files"):
        load_runs(tmp_path / "empty")


def test_budgets_from_column_target_or_compute():
    df = _grid()
    # bucketed compute: third-decade buckets, a run 3% off its target stays in its bucket
    f = load_runs(df.assign(compute=lambda x: x["compute"].round(-15))).frame
    assert f["budget"].nunique() == len(np.unique(np.rint(3 * np.log10(df["compute"]))))
    # training's FLOP target, when recorded, defines the budget
    t = load_runs(df.assign(budget_compute=np.where(df["tokens"] < 2e9, 1e17, 1e18)))
    assert set(t.frame["budget"]) == {1e17, 1e18} and set(t.budget_labels.values()) == {"1e17", "1e18"}
    assert set(load_runs(df.assign(budget="b")).frame["budget"]) == {"b"}


def test_store_written_by_training_is_read(tmp_path):
    write_run = pytest.importorskip("training.results_store").write_run
    rows = _grid().head(12)
    for i, row in rows.iterrows():
        write_run(tmp_path, {"run_id": f"h{i:04d}", "name": f"run{i}", "sweep": "s", "variant": "base",
                             "status": "completed" if i else "diverged", "d_model": 64, "r": int(row["r"]),
                             "n_once": int(row["n_once"]), "n_rec": int(row["n_rec"]), "flops_per_token": 1e6,
                             "tokens": int(row["tokens"]), "compute": 1e6 * row["tokens"],
                             "val_loss": float(row["val_loss"]) if i else float("nan")})
    table = load_runs(tmp_path)
    assert len(table) == 11 and table.excluded == [{"run": "run0 [h0000]", "reason": "status 'diverged'"}]
