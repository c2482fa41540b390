"""End to end: train.fit with the hidden-state cache gives the same numbers as without it, running the backbone once."""

import pytest

import readlib.cache
import readlib.paths
import readlib.train
from readlib import backbones
from readlib.errors import ConfigError
from readlib.params import make_params
from readlib.train import fit

# --- fit() ------------------------------------------------------------------------------------------

CACHE_RUN = dict(task="rte", method="read", backbone="minilm", max_train=48, max_eval=24, max_epochs=2,
             batch_size=16, micro_batch_size=8, max_length=32)


TRAIN, EVAL, EPOCHS = 48, 24, 2


class BackboneCalls:
    """Counts backbone passes: calls, examples (rows) and non-padding tokens given to hidden_states."""

    def __init__(self, monkeypatch):
        self.calls, self.rows, self.tokens, self.tokens_per_call = 0, 0, 0, []
        original = backbones.Backbone.hidden_states

        def counting(backbone, input_ids, attention_mask, token_type_ids=None):
            self.calls += 1
            self.rows += input_ids.shape[0]
            self.tokens += int(attention_mask.sum())
            self.tokens_per_call.append(int(attention_mask.sum()))
            return original(backbone, input_ids, attention_mask, token_type_ids)

        monkeypatch.setattr(backbones.Backbone, "hidden_states", counting)


def counted_fit(**overrides):
    with pytest.MonkeyPatch.context() as mp:
        calls = BackboneCalls(mp)
        record = fit(make_params("quick", **(CACHE_RUN | overrides)), progress=False)
    return record, calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readlib.paths, "OUTPUT_DIR", out)
        result = {mode: counted_fit(cache=mode) for mode in ("off", "memory", "disk")}
        result["disk again"] = counted_fit(cache="disk")
    result["dir"] = out
    return result


def assert_same_results(a: dict, b: dict, tol: float = 1e-5):
    assert a["validation"] == b["validation"]
    assert a["test"] == b["test"]
    assert [r["epoch"] for r in a["history"]] == [r["epoch"] for r in b["history"]]
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=tol)
        assert ra["val_score"] == rb["val_score"]


def test_same_seed_same_metrics_with_and_without_cache(runs):
    off, memory = runs["off"][0], runs["memory"][0]
    assert off["epochs_run"] == memory["epochs_run"] == EPOCHS
    assert_same_results(off, memory)


def test_backbone_runs_once_per_example_with_the_cache(runs):
    off_calls, memory_calls = runs["off"][1], runs["memory"][1]
    # after training, the record's costs (train.step_costs): a micro-batch of 8 for the training FLOPs and twice
    # for the memory phases (read from the cache when there is one), and a validation batch of 16 for the
    # inference FLOPs, the latency warm-up and each timed repeat (never from the cache)
    inference = (2 + readlib.train.LATENCY_REPEATS) * 16
    # without a cache: validation before training (the step-0 score), every training example and every validation
    # example in each epoch, then test once
    assert off_calls.rows == EVAL + EPOCHS * TRAIN + EPOCHS * EVAL + EVAL + 3 * 8 + inference == 192 + 24 + 80
    # with it: each example of each split once, in batches of 2 x micro_batch_size = 16
    assert memory_calls.rows == TRAIN + EVAL + EVAL + inference == 96 + 80
    assert memory_calls.calls == 3 + 2 + 2 + 2 + readlib.train.LATENCY_REPEATS


def test_record_describes_the_cache(runs):
    off, memory = runs["off"][0], runs["memory"][0]
    assert off["cache"] == {"mode": "off"}
    info = memory["cache"]
    assert set(info) == {"mode", "dtype", "bytes", "seconds", "fill_flops"}
    assert (info["mode"], info["dtype"]) == ("memory", "float32")
    # all tokens of all three splits (the 3 + 2 + 2 filling passes come first), 6 layers of 384 float32 values each
    assert info["bytes"] == sum(runs["memory"][1].tokens_per_call[:7]) * 6 * 384 * 4
    assert 0 <= info["seconds"] < memory["wall_time_s"]


def test_disk_cache_in_fit_is_written_then_reused(runs):
    disk, disk_calls = runs["disk"]
    again, again_calls = runs["disk again"]
    assert disk["cache"]["mode"] == "disk" and disk["cache"]["bytes"] == runs["memory"][0]["cache"]["bytes"]
    # the fill's FLOPs are kept in the disk cache's marker: a run that reuses it counts the same training compute
    fill = runs["memory"][0]["cache"]["fill_flops"]
    assert fill > 0 and disk["cache"]["fill_flops"] == again["cache"]["fill_flops"] == fill
    assert [r["train_flops"] for r in again["history"]] == [r["train_flops"] for r in runs["memory"][0]["history"]]
    inference = (2 + readlib.train.LATENCY_REPEATS) * 16  # the record's inference costs, never from the cache
    assert disk_calls.rows == 96 + inference
    assert again_calls.calls == 2 + readlib.train.LATENCY_REPEATS  # every split came from disk
    dirs = sorted((runs["dir"] / "cache").iterdir())
    assert len(dirs) == 3
    assert all(sorted(p.name for p in d.iterdir()) == ["complete", "states.npy"] for d in dirs)
    assert sum((d / "states.npy").stat().st_size for d in dirs) > disk["cache"]["bytes"]  # + .npy headers
    assert_same_results(disk, runs["off"][0])
    assert_same_results(again, disk, tol=0)


def test_fit_fails_before_any_backbone_pass_when_the_cache_cannot_fit(monkeypatch):
    monkeypatch.setattr(readlib.cache, "available_memory", lambda: 1024)
    calls = BackboneCalls(monkeypatch)
    with pytest.raises(ConfigError, match="cache=disk"):
        fit(make_params("quick", **CACHE_RUN), progress=False)
    assert calls.calls == 0


def test_full_fine_tuning_ignores_the_cache():
    record, calls = counted_fit(method="full", cache="memory", max_train=8, max_eval=4, max_epochs=1,
                                batch_size=8, max_length=16)
    assert record["cache"] == {"mode": "off"}
    assert record["status"] == "ok"
    assert calls.calls == 0  # full fine-tuning runs the trainable backbone itself, never from states


def test_text_to_text_read_trains_from_the_cache_with_the_same_numbers():
    # encoder states, decoder states and cross-attention scores come from the cache; evaluation
    # generates, so only the training split is cached
    runs = {}
    for mode in ("off", "memory"):
        runs[mode] = fit(make_params("quick", task="stsb", method="read", backbone="random-t5-tiny", max_train=24,
                                     max_eval=8, max_epochs=2, patience=2, lr=3e-3, batch_size=8, micro_batch_size=4,
                                     max_length=32, cache=mode), progress=False)
    losses = [[row["train_loss"] for row in runs[mode]["history"]] for mode in ("off", "memory")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert runs["off"]["test"] == runs["memory"]["test"]
    assert runs["memory"]["cache"]["mode"] == "memory" and runs["memory"]["cache"]["bytes"] > 0
