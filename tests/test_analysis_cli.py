"""The CLI end to end on a results store written in the documented schema, and the figures it draws."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("models.accounting")

from analysis import ScalingLaw  # noqa: E402
from analysis.cli import main  # noqa: E402
from analysis.synthetic import synthetic_sweep, write_store  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    runs = synthetic_sweep(ScalingLaw.reference(), noise=0.005, seed=0)
    runs.loc[0, "status"] = "diverged"  # recorded, never silently dropped
    return write_store(runs, root / "results")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_query_plot_end_to_end(store, tmp_path, capsys):
    law_path = tmp_path / "law.json"
    code, out, err = _run(capsys, "fit", str(store), "--out", str(law_path), "--bootstrap", "40", "--jobs", "1")
    assert code == 0, err
    result = json.loads(out)
    assert result["form"] == "looped" and result["n_runs"] == 115 and result["excluded"] == 1
    law = ScalingLaw.load(law_path)
    assert law.draws.shape == (40, 6) and "phi" in law.ci and law.loo["per_budget"]
    assert any("diverged" in e["reason"] for e in law.excluded)

    code, out, _ = _run(capsys, "query", str(law_path), "predict", "--n-once", "2e7", "--n-rec", "2e7", "--r", "4",
                        "--tokens", "1e9", "--ci", "--json")
    q = json.loads(out)
    assert code == 0 and q["low"] < q["value"] < q["high"]
    assert q["value"] == pytest.approx(law.predict(2e7, 2e7, 4, 1e9))

    code, out, _ = _run(capsys, "query", str(law_path), "effective", "--n-once", "2e7", "--n-rec", "2e7", "--r", "4",
                        "--json")
    assert json.loads(out)["value"] == pytest.approx(2e7 + 4 ** law.phi * 2e7)
    code, out, _ = _run(capsys, "query", str(law_path), "dense-equivalent", "--n-once", "2e7", "--n-rec", "2e7", "--r", "1",
                        "--json")
    assert json.loads(out)["value"] == pytest.approx(4e7)  # dense-equivalent: the same quantity under its other name
    code, out, _ = _run(capsys, "query", str(law_path), "effective", "--n-once", "0", "--n-rec", "2e7", "--r", "4", "--json")
    assert code == 0 and json.loads(out)["value"] == pytest.approx(4 ** law.phi * 2e7)  # all-recurrent is fine
    for bad in (["--n-once=-1e8", "--n-rec", "1e8", "--r", "4"], ["--n-once", "1e8", "--n-rec", "1e8", "--r", "0.5"]):
        code, out, err = _run(capsys, "query", str(law_path), "effective", *bad)
        assert code == 2 and not out and ("n_once:" in err or "r:" in err), err
    code, out, err = _run(capsys, "query", "reference", "predict", "--n-once", "1e8", "--n-rec", "1e8", "--r", "4",
                          "--tokens", "-5")
    assert code == 2 and "tokens: must be finite and > 0" in err

    code, out, _ = _run(capsys, "query", str(law_path), "optimal", "--compute", "1e19", "--r-values", "1,2,4",
                        "--max-unique-params", "3e8", "--json")
    opt = json.loads(out)
    assert code == 0 and opt["best"]["r"] in (1, 2, 4) and opt["best"]["unique_params"] <= 3e8
    assert len(opt["table"]) == 3 and opt["best"]["loss_ci"] is not None

    figs = tmp_path / "figs"
    code, out, err = _run(capsys, "plot", str(store), "--out", str(figs), "--law", str(law_path))
    assert code == 0, err
    written = json.loads(out)["figures"]
    names = sorted(p.split("/")[-1] for p in written)
    assert names == ["isoflop.png", "loss_vs_compute.png", "phi_bootstrap.png", "residuals.png"]
    for p in written:
        data = open(p, "rb").read()
        assert data.startswith(PNG) and len(data) > 5000


def test_errors_are_reported_not_raised(tmp_path, capsys):
    code, _, err = _run(capsys, "fit", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json"))
    assert code == 2 and "does not exist" in err


def test_help_of_every_subcommand(capsys):
    for argv in (["fit"], ["compare"], ["query"], ["query", "reference", "optimal"], ["query", "reference", "predict"], ["plot"],
                 ["depth"]):
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0
        assert "usage: python -m analysis" in capsys.readouterr().out
    # and the module entry point itself
    proc = subprocess.run([sys.executable, "-m", "analysis", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "{fit,compare,query,plot,depth,eval,lmeval}" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_module_entry_point_fits_a_store(store, tmp_path):
    out = tmp_path / "law.json"
    proc = subprocess.run([sys.executable, "-m", "analysis", "fit", str(store), "--out", str(out), "--bootstrap", "20",
                           "--no-extrapolation"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert ScalingLaw.load(out).phi == pytest.approx(0.459, abs=0.1)


def test_fit_quarantines_unreadable_run_files_and_fits_the_rest(tmp_path):
    runs = synthetic_sweep(ScalingLaw.reference(), noise=0.005, seed=0)
    store = write_store(runs, tmp_path / "results")
    folder = store / "runs"
    truncated = f"{runs.loc[3, 'run_id']}.parquet"
    data = (folder / truncated).read_bytes()
    (folder / truncated).write_bytes(data[: len(data) // 3])
    (folder / "junk.parquet").write_text("this is not parquet")

    proc = subprocess.run([sys.executable, "-m", "analysis", "fit", str(store), "--out", str(tmp_path / "law.json"),
                           "--bootstrap", "0", "--no-extrapolation"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n_runs"] == len(runs) - 1
    assert set(result["quarantined"]) == {truncated, "junk.parquet"}
    assert truncated in proc.stderr and "junk.parquet" in proc.stderr  # the summary names both
    kept = sorted(p.name for p in (folder / "_quarantine").glob("*.parquet"))
    assert len(kept) == 2 and kept[0].startswith(truncated[:-8]) is not kept[1].startswith(truncated[:-8])
    assert not (folder / truncated).exists() and not (folder / "junk.parquet").exists()
    saved = ScalingLaw.load(tmp_path / "law.json")
    assert {e["run"] for e in saved.excluded if e.get("quarantined")} == {truncated, "junk.parquet"}
