"""Downstream evaluation end to end: a tiny looped run trained on a real local Ray (ZeRO-2, two workers, a wsd
cooldown branch) stores its final weights and its branch's, and the real lm-evaluation-harness scores them on a
small task defined here on a local JSON file (held-out verses of the embedded corpus, the true ending against
strings of random letters): above chance, identically on a rerun, one stored row per depth, nothing stored
evaluated again or replaced."""
import json
import math
import random
import string

import pandas as pd
import pytest
import torch

from training import results_store
from training.config import RunConfig

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is absent: pip install -e '.[eval]'")

from lm_eval.tasks import TaskManager  # noqa: E402  (after the skip: the eval extra may be absent)

import analysis.lm_model  # noqa: E402,F401  (registers the "looplaw" model with lm-eval)
from analysis.cli import main as analysis_main  # noqa: E402
from analysis.eval_tasks.build import heldout_verses, item  # noqa: E402
from training.loader import validation_batches  # noqa: E402
from training.prepare import ensure_default_data  # noqa: E402
from training.weights import read_weights  # noqa: E402

pytestmark = pytest.mark.slow

EASY_ITEMS = 60
EASY_YAML = """task: looplaw_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def _noise(ending: str, rng: random.Random) -> str:
    """Letters and spaces where the ending has them: the same length, no words."""
    return "".join(c if c == " " else rng.choice(string.ascii_lowercase) for c in ending)


@pytest.fixture(scope="module")
def easy_task(tmp_path_factory):
    """A folder holding the task YAML and its JSON lines, built from the held-out split of the embedded corpus."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for before, verse in heldout_verses()[:EASY_ITEMS]:
        ending = " " + " ".join(verse.split()[-5:])
        rows.append(item(before, verse, [_noise(ending, rng) for _ in range(3)], rng))
    (folder / "easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "easy.yaml").write_text(EASY_YAML.format(data=folder / "easy.jsonl", cache=folder / "hf-cache"))
    return folder


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    from training.run import execute

    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 64, "seq_len": 64, "vocab_size": 512},
        "optim": {"lr": 3e-3, "embed_lr_mult": 10.0, "schedule": "wsd"},
        "budget": {"tokens": 1024 * 30}, "horizons": [1024 * 20], "batch_tokens": 1024, "micro_batch": 4,
        "zero_stage": 2, "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
        "eval_every": 10, "checkpoint_every": 100, "val_tokens": 2048, "max_failures": 0,
        "storage": str(tmp_path_factory.mktemp("store")), "name": "evals",
    })
    row = execute(cfg)
    assert row["status"] == "completed", row.get("error")
    return cfg, row


def test_training_stores_the_final_weights_of_the_run_and_of_its_branch(trained):
    cfg, row = trained
    stored = read_weights(cfg.storage, cfg.run_id)
    assert stored.step == 30 and stored.config == cfg.model and "<|bos|>" in stored.tokenizer_json
    # the weights are the final model's: both ranks' validation batches give the run's final loss
    data = ensure_default_data(vocab_size=512)
    batches = [b for rank in (0, 1) for b in validation_batches(data, 64, 4, 2048, rank, 2)]
    model = stored.model()
    with torch.no_grad():
        loss = sum(float(model(x, y)[1]) for x, y in batches) / len(batches)
    assert loss == pytest.approx(row["val_loss"], rel=1e-5)
    branch_id = cfg.branch_config(1024 * 20).run_id
    branch = read_weights(cfg.storage, branch_id)
    assert branch.step == 20 and results_store.read_run(cfg.storage, branch_id)["status"] == "completed"
    assert any(not torch.equal(branch.state_dict[k], stored.state_dict[k]) for k in stored.state_dict)


@pytest.fixture
def one_thread():
    """One torch thread in this process, as each evaluation task has: two threads on two cores shared with the
    Ray workers run many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_trained_run_scores_above_chance_and_the_same_on_a_rerun(trained, easy_task, one_thread):
    cfg, _ = trained
    manager = TaskManager(include_path=str(easy_task), include_defaults=False)
    scores = []
    for _ in range(2):
        results = lm_eval.simple_evaluate(model="looplaw", model_args=f"run={cfg.storage}/{cfg.run_id},r=2",
                                          tasks=["looplaw_easy"], task_manager=manager, batch_size=16)
        scores.append(results["results"]["looplaw_easy"])
    acc, stderr = scores[0]["acc,none"], scores[0]["acc_stderr,none"]
    assert results["n-samples"]["looplaw_easy"]["effective"] == EASY_ITEMS
    assert acc > 0.25 + 3 * stderr, scores[0]  # chance is 1 in 4
    assert scores[0] == scores[1]


def test_a_depth_sweep_stores_one_row_per_depth_and_resumes_without_replacing(trained, easy_task, capsys):
    cfg, _ = trained
    args = ["eval", cfg.storage, "--tasks", "looplaw_easy", "--include-path", str(easy_task), "--runs", cfg.run_id,
            "--plot", str(easy_task / "evals.png")]
    assert analysis_main([*args, "--depths", "1,2,4"]) == 0
    out = capsys.readouterr().out
    assert "looplaw_easy: acc at each test-time r'" in out and cfg.run_id in out
    first = results_store.read_evals(cfg.storage, cfg.run_id).to_pandas()
    assert sorted(first["depth"]) == [1, 2, 4] and set(first["metric"]) == {"acc"}
    assert (first["task"] == "looplaw_easy").all() and (first["trained_r"] == 2).all()
    assert (first["n_samples"] == EASY_ITEMS).all() and (first["chance"] == 0.25).all()
    assert first["task_hash"].nunique() == 1 and (first["lm_eval_version"] == lm_eval.__version__).all()
    assert first["value"].between(0, 1).all() and first["stderr"].ge(0).all()

    assert analysis_main([*args, "--depths", "1,2,4,8"]) == 0  # only r'=8 is new
    assert "evaluated 1 runs" in capsys.readouterr().out
    second = results_store.read_evals(cfg.storage, cfg.run_id).to_pandas()
    assert sorted(second["depth"]) == [1, 2, 4, 8]
    pd.testing.assert_frame_equal(second[second["depth"] < 8].reset_index(drop=True), first)  # kept as they were

    assert analysis_main([*args, "--depths", "2,8"]) == 0  # all stored: nothing runs, nothing changes
    assert "evaluated 0 runs" in capsys.readouterr().out
    pd.testing.assert_frame_equal(results_store.read_evals(cfg.storage, cfg.run_id).to_pandas(), second)
    assert math.isfinite(second.loc[second["depth"] == 8, "value"].iloc[0])
