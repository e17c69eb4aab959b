"""The `looplaw` lm-eval model and the eval command's checks, without Ray: a small random model written to a store
as training writes it, scored by the real harness; each answer checked against the model's own forward."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import LoopedConfig, LoopedLM
from training import corpus, results_store
from training.config import RunConfig
from training.run import make_row
from training.tokenizer import train_tokenizer
from training.weights import write_weights

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is absent: pip install -e '.[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402  (after the skip: the eval extra may be absent)
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from analysis.cli import main as analysis_main  # noqa: E402
from analysis.eval_tasks import LOCAL_TASKS, TASKS_DIR  # noqa: E402
from analysis.eval_tasks.build import build  # noqa: E402
from analysis.lm_model import LooplawLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "d32-r2-0123456789abcdef"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding one run's weights (random, with a spread-out head so that scores differ), no row."""
    folder = tmp_path_factory.mktemp("store")
    tok = train_tokenizer(corpus.default_corpus_texts()[:40], vocab_size=300)
    cfg = LoopedConfig.tiny(r=2, d_model=32, seq_len=32, vocab_size=tok.get_vocab_size(),
                            injection="additive_normed_per_layer")
    torch.manual_seed(0)
    model = LoopedLM(cfg)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    write_weights(folder, RUN_ID, model.state_dict(), cfg, tok.to_str(), step=7)
    return str(folder)


def requests(kind: str, *args) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def direct_logp(lm: LooplawLM, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context) from one unbatched forward."""
    head, cont = lm._encode_pair(context, continuation)
    tokens = torch.tensor([head + cont])
    with torch.no_grad():
        logits, _ = lm.model(tokens[:, :-1], r=lm.r)
    logp = torch.log_softmax(logits[0, -len(cont):], dim=-1)
    return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())


PAIRS = [("In the beginning", " God created"), ("", "And the earth"), ("Let there be light: and", " there was"),
         ("He said unto them, ", "Go ye"), ("And", " the")]


def test_registered_with_lm_eval_and_loaded_from_the_store(store):
    assert get_model("looplaw") is LooplawLM
    lm = LooplawLM(run=f"{store}/{RUN_ID}")
    assert (lm.r, lm.trained_r, lm.step, lm.max_length) == (2, 2, 7, 32)
    assert LooplawLM(run=RUN_ID, store=store, r=5).r == 5
    assert lm.get_model_info()["run_id"] == RUN_ID


def test_loglikelihood_is_the_models_own_and_independent_of_the_batch(store):
    single = LooplawLM(run=f"{store}/{RUN_ID}", batch_size=1)
    batched = LooplawLM(run=f"{store}/{RUN_ID}", batch_size=4)
    one = single.loglikelihood(requests("loglikelihood", *PAIRS))
    many = batched.loglikelihood(requests("loglikelihood", *PAIRS))
    for (logp, greedy), (logp_b, greedy_b), pair in zip(one, many, PAIRS):
        assert logp == pytest.approx(direct_logp(single, *pair), abs=1e-4)
        assert logp_b == pytest.approx(logp, abs=1e-4) and greedy_b == greedy
    deeper = LooplawLM(run=f"{store}/{RUN_ID}", r=4).loglikelihood(requests("loglikelihood", *PAIRS))
    assert [d[0] for d in deeper] != pytest.approx([o[0] for o in one], abs=1e-3)  # r changes the model


def test_rolling_loglikelihood_scores_every_token_once(store):
    lm = LooplawLM(run=f"{store}/{RUN_ID}")
    short = "And God saw the light, that it was good."
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,)))
    assert rolling == pytest.approx(direct_logp(lm, "", short), abs=1e-4)
    long = " ".join(["and the evening and the morning were the first day"] * 8)  # several windows of 32 tokens
    assert len(lm.encode(long)) > 2 * lm.max_length
    [total] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (long,)))
    [prefix] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (long[:40],)))
    assert total < prefix < 0


def test_generation_is_greedy_and_stops_where_asked(store):
    lm = LooplawLM(run=f"{store}/{RUN_ID}", batch_size=2)
    contexts = ["And God said", "In the beginning", "Blessed are"]
    tokens = []
    for context in contexts:  # the greedy continuation, one forward per token
        row = [lm.bos] + lm.encode(context)
        new = []
        for _ in range(6):
            with torch.no_grad():
                logits, _ = lm.model(torch.tensor([row + new]), r=2)
            nxt = int(logits[0, -1].argmax())
            if nxt == lm.bos:
                break
            new.append(nxt)
        tokens.append(new)
    out = lm.generate_until(requests("generate_until", *[(c, {"until": [], "max_gen_toks": 6}) for c in contexts]))
    assert out == [lm.tokenizer.decode(t) for t in tokens]
    stop = out[0][2:4]
    [cut] = lm.generate_until(requests("generate_until", (contexts[0], {"until": [stop], "max_gen_toks": 6})))
    assert cut == out[0][:out[0].index(stop)]
    with pytest.raises(ValueError, match="decodes greedily"):
        lm.generate_until(requests("generate_until", ("x", {"do_sample": True})))


@pytest.mark.parametrize("kwargs, message", [
    ({"run": f"nowhere/{RUN_ID}"}, f"run {RUN_ID}: no final weights"),
    ({"run": RUN_ID}, "has no store part"),
    ({"r": 0}, "r: 0 must be an integer >= 1"),
    ({"batch_size": "big"}, "batch_size: 'big'"),
    ({"dtype": "int8"}, "dtype: 'int8'"),
])
def test_bad_model_arguments_are_refused_naming_them(store, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LooplawLM(**{"run": f"{store}/{RUN_ID}", **kwargs})


def test_the_local_tasks_run_in_the_real_harness_and_are_their_builders_output(store, tmp_path):
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(LOCAL_TASKS) <= set(manager.all_tasks)
    results = lm_eval.simple_evaluate(model="looplaw", model_args=f"run={store}/{RUN_ID},r=3",
                                      tasks=list(LOCAL_TASKS), task_manager=manager, limit=6)
    for task in LOCAL_TASKS:
        assert results["n-samples"][task]["effective"] == 6 and 0 <= results["results"][task]["acc,none"] <= 1
    assert results["config"]["r"] == 3
    assert build(tmp_path) == {task: 500 for task in LOCAL_TASKS}
    for task in LOCAL_TASKS:  # the shipped items are what the builder makes from the held-out split
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (TASKS_DIR / f"{task}.jsonl").read_bytes()
        first = json.loads((TASKS_DIR / f"{task}.jsonl").read_text().splitlines()[0])
        assert len(first["choices"]) == 4 and first["choices"][first["label"]].startswith(" ")


def test_lm_evals_own_command_runs_the_looplaw_model_on_the_local_tasks(store, capsys):
    assert analysis_main(["lmeval", "--model", "looplaw", "--model_args", f"run={store}/{RUN_ID},r=1",
                          "--tasks", "kjv_order", "--limit", "4", "--batch_size", "8"]) == 0
    table = capsys.readouterr().out
    assert "looplaw (" in table and "|kjv_order|" in table and "acc_norm" in table


@pytest.fixture
def store_with_rows(store):
    """The weights' run and a second run, both with rows; only the first has weights."""
    for run_id, d in ((RUN_ID, 32), (None, 48)):
        cfg = RunConfig.from_dict({"model": {"family": "tiny", "r": 2, "d_model": d, "seq_len": 32, "vocab_size": 300},
                                   "budget": {"tokens": 1024}, "batch_tokens": 256, "micro_batch": 8,
                                   "storage": store})
        row = make_row(cfg, {"status": "completed", "val_loss": 5.0, "steps": 4})
        results_store.write_run(store, {**row, "run_id": run_id or row["run_id"]})
    return store, row["run_id"]


def test_the_eval_command_names_a_bad_task_depth_or_run_before_evaluating(store_with_rows, capsys):
    store, unweighted = store_with_rows
    assert analysis_main(["eval", store, "--tasks", "kjv_cloze,no_such_task"]) == 2
    assert "tasks: ['no_such_task'] are not lm-eval tasks" in capsys.readouterr().err
    assert analysis_main(["eval", store, "--tasks", "kjv_cloze", "--depths", "0,2"]) == 2
    assert "depths: [0] are not recurrence counts" in capsys.readouterr().err
    assert analysis_main(["eval", store, "--tasks", "kjv_cloze", "--depths", "1,two"]) == 2
    assert "depths: '1,two' is not a comma-separated list of integers" in capsys.readouterr().err
    assert analysis_main(["eval", store, "--tasks", "kjv_cloze"]) == 2
    assert f"runs without final weights (STORE/weights/<run_id>.pt): {unweighted}." in capsys.readouterr().err
    assert analysis_main(["eval", store, "--tasks", "kjv_cloze", "--runs", "d8-r1-nothere"]) == 2
    assert "runs: ['d8-r1-nothere'] are not in the store" in capsys.readouterr().err
    assert not (Path(store) / "evals").exists()  # nothing was evaluated, nothing written


def test_without_the_eval_extra_the_command_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['lm_eval'] = None; from analysis.cli import main; "
            f"sys.exit(main(['eval', {str(tmp_path)!r}, '--tasks', 'kjv_cloze']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install -e '.[eval]'" in proc.stderr, proc.stderr[-2000:]
