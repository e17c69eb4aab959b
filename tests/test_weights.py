"""A run's final weights in the store (training.weights): written atomically, read back whole, anywhere pyarrow.fs
reaches; a run without them is named with what to do."""
import pytest
import torch

from models import LoopedConfig, LoopedLM
from training.weights import has_weights, read_weights, write_weights


def test_weights_round_trip_to_the_same_model(tmp_path):
    store = f"file://{tmp_path}/store"  # a pyarrow.fs URI, as on a cluster
    cfg = LoopedConfig.tiny(r=2, d_model=32, seq_len=16, vocab_size=64)
    torch.manual_seed(0)
    model = LoopedLM(cfg).eval()
    assert not has_weights(store, "d32-r2-abc")
    write_weights(store, "d32-r2-abc", model.state_dict(), cfg, '{"tokenizer": 1}', step=12)
    assert has_weights(store, "d32-r2-abc")
    stored = read_weights(store, "d32-r2-abc")
    assert (stored.step, stored.config, stored.tokenizer_json) == (12, cfg, '{"tokenizer": 1}')
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(stored.model()(tokens, r=3)[0], model(tokens, r=3)[0])
    assert [p.name for p in (tmp_path / "store" / "weights").iterdir()] == ["d32-r2-abc.pt"]  # no temp file left


def test_a_run_without_weights_is_named_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run d8-r1-old: no final weights in the store .*train it again"):
        read_weights(tmp_path, "d8-r1-old")
    with pytest.raises(ValueError, match="run_id: '../x'"):
        has_weights(tmp_path, "../x")
