"""The sweep: study names, the protocol (search, best lr, seeds), architecture selection (multi-process runs:
integration/test_sweep_workers.py).

Runs are tiny real trainings (BitFit on MiniLM, 16 RTE training examples) so that the storage logic is tested
end to end through ``readlib.train.fit``.
"""

import dataclasses

import optuna
import pytest
from helpers import TINY, spec, trials
from optuna.trial import TrialState

from readlib import backbones, checkpoint, sweep
from readlib.errors import ConfigError, DataNotFoundError
from readlib.params import RunParams


def test_study_name_changes_with_what_changes_results_only():
    base = spec()
    assert spec(lr_rounds=10, seeds=1).name == base.name  # more rounds extend the same study
    assert spec(overrides=TINY | {"max_train": 32}).name != base.name
    assert spec(method_args={"dropout": 0.2}).name != base.name
    assert spec(method_args={"dropout": 0.1}).name == base.name  # a default spelt out is the same study
    assert spec(method="lora").name != base.name
    lst = spec(method="lst")  # recomputing the side attention changes bytes and time, not a single value
    assert spec(method="lst", method_args={"recompute_attention": False}).name == lst.name
    assert spec(method="lst", method_args={"reduction": 4}).name != lst.name
    assert spec(overrides=TINY | {"precision": "bf16"}).name != base.name  # recorded in study names, as in records
    assert spec(method="full", overrides=TINY | {"gradient_checkpointing": True}).name != spec(method="full").name
    keys = {item.split("=")[0] for item in base.name.split("|")}
    assert {"task", "method", "backbone", "max_train", "method_args", "profile"} <= keys
    assert not keys & {"lr", "seed", "device", "cache", "energy_interval"}  # searched, varied, or no effect
    # backbone_quant "none" stays out of names, so studies from before it existed keep theirs; int8 is named
    assert keys | {"lr", "seed", "device", "cache", "energy_interval", "method", "backbone_quant"} >= set(
        RunParams.__dataclass_fields__)
    assert "|backbone_quant=\"int8\"|" in spec(method="read", overrides=TINY | {"backbone_quant": "int8"}).name


@pytest.mark.parametrize("changes, error, needle", [
    ({"lr_rounds": 0}, ConfigError, "lr_rounds must be >= 1"),
    ({"seeds": 0}, ConfigError, "seeds must be >= 1"),
    ({"method": "nope"}, ConfigError, "unknown method 'nope'"),
    ({"overrides": {"max_epochs": 0}}, ConfigError, "max_epochs must be >= 1"),
])
def test_bad_input_fails_before_any_run(changes, error, needle, tmp_path):
    with pytest.raises(error, match=needle):
        sweep.run_worker(spec(**changes), f"sqlite:///{tmp_path / 's.db'}")
    assert not (tmp_path / "s.db").exists()


def test_missing_task_data_is_one_paragraph_before_any_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(DataNotFoundError, match="qqp") as err:
        sweep.run_worker(spec(task="qqp", overrides=TINY | {"data_dir": str(tmp_path)}), f"sqlite:///{tmp_path}/s.db")
    assert "data_dir" in str(err.value) and "\n" not in str(err.value)


def test_worker_runs_the_protocol_and_never_repeats_a_finished_run(tmp_path):
    url, s = f"sqlite:///{tmp_path / 's.db'}", spec()
    labels = []
    assert sweep.run_worker(s, url, heartbeat=1, on_trial=labels.append) == 4  # 3 search trials + seed 1
    assert labels == ["search 1", "search 2", "search 3", "seed run"]
    search, seeds = trials(url, s.name), trials(url, s.name + "|seeds")
    assert [t.state for t in search] == [TrialState.COMPLETE] * 3
    assert len({t.params["lr"] for t in search}) == 3 and all(1e-6 <= t.params["lr"] <= 3e-3 for t in search)
    assert search[0].params["lr"] == 1e-3  # round 1: BitFit's default learning rate
    best = max(search, key=lambda t: (t.value, -t.number))
    assert [(t.state, t.params) for t in seeds] == [(TrialState.COMPLETE, {"lr": best.params["lr"], "seed": 1})]
    for t in search + seeds:  # the full record lives in the storage, with how it was produced
        record = t.user_attrs["record"]
        assert record["lr"] == t.params["lr"] and record["validation"]["score"] == t.value
        assert record["sweep"]["study"] == s.name and record["data"]["sizes_used"]["train"] == 16

    result = sweep.summary(s, url)
    assert result["lr"] == best.params["lr"] and result["validation"] == best.value
    tests = [t.user_attrs["record"]["test"]["score"] for t in (best, seeds[0])]
    assert result["seeds"] == [0, 1] and result["test_by_seed"] == tests
    assert result["test_mean"] == pytest.approx(sum(tests) / 2) and result["search_runs"] == 3

    assert sweep.run_worker(s, url, heartbeat=1) == 0  # the same command again: nothing is re-run
    ran = sweep.run_worker(spec(lr_rounds=4), url, heartbeat=1)  # one more round; seed runs again if lr changed
    search = trials(url, s.name)
    changed = max(search, key=lambda t: (t.value, -t.number)).number != best.number
    assert len(search) == 4 and ran == 1 + changed


def test_architecture_selection_by_mean_best_validation_over_complete_tasks(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.setitem(sweep.ARCHITECTURES, "lora", [{"rank": 2}, {"rank": 4}])
    base = spec(method="lora", lr_rounds=1, seeds=1)
    for task, args in (("rte", {"rank": 2}), ("rte", {"rank": 4}), ("mrpc", {"rank": 2}), ("cola", {"rank": 4})):
        sweep.run_worker(dataclasses.replace(base, task=task, method_args=args), url, heartbeat=1)
    rows = sweep.architecture_scores(base, ["rte", "mrpc", "cola", "stsb"], url)
    by_rank = {r["method_args"]["rank"]: r for r in rows}
    for rank in (2, 4):  # only RTE has both candidates: the mean is over RTE alone
        s = dataclasses.replace(base, method_args={"rank": rank})
        assert by_rank[rank]["tasks"] == ["rte"]
        assert by_rank[rank]["mean_validation"] == sweep.summary(s, url)["validation"]
        assert by_rank[rank]["stsb"] is None
    assert by_rank[2]["mrpc"] is not None and by_rank[4]["mrpc"] is None
    assert rows[0]["selected"] and not rows[1]["selected"]
    assert rows[0]["mean_validation"] >= rows[1]["mean_validation"]


def test_the_profile_sweep_block_sets_rounds_seeds_and_trial_settings():
    s = sweep.SweepSpec("rte", "read", "default")
    assert (s.lr_rounds, s.seeds) == (1, 1)
    p = s.params(1e-3, 0)
    # params/default.yaml sweep.runs
    assert (p.max_train, p.max_eval, p.max_epochs, p.patience, p.batch_size) == (500, 400, 2, 1, 8)
    p = sweep.SweepSpec("rte", "read", "default", overrides={"max_train": 50, "max_epochs": None}).params(1e-3, 0)
    assert (p.max_train, p.max_epochs) == (50, 2)  # explicit overrides win; None keeps
    assert sweep.SweepSpec("rte", "read", "paper", backbone="minilm").lr_rounds == 32


def test_studies_draw_different_learning_rates(tmp_path):
    # the sampler's seed depends on the study: two methods do not search the same two learning rates
    url = f"sqlite:///{tmp_path / 's.db'}"
    drawn = {}
    for method in ("bitfit", "lora"):
        s = spec(method=method, lr_rounds=2, seeds=1)
        sweep.run_worker(s, url, heartbeat=1)
        drawn[method] = [t.params["lr"] for t in trials(url, s.name)]
    assert drawn["bitfit"][0] == 1e-3 and drawn["lora"][0] == 5e-4  # round 1: each method's default
    assert drawn["bitfit"][1] != drawn["lora"][1]


def test_a_raced_duplicate_seed_run_defers_to_the_earlier_one(tmp_path):
    # two workers enqueueing the seed runs at once both queue {"lr", "seed": 1}; only the earlier trial may run it
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    params = {"lr": 1e-3, "seed": 1}
    study.enqueue_trial(params)
    study.enqueue_trial(params)
    first, second = study.ask(), study.ask()
    assert not sweep._earlier_twin(first, params) and sweep._earlier_twin(second, params)
    assert not sweep._earlier_twin(second, {"lr": 1e-3, "seed": 2})


def test_every_trial_reports_its_validation_score_per_epoch(tmp_path):
    # optuna-dashboard draws learning curves from the intermediate values, pruning on or off
    url, s = f"sqlite:///{tmp_path / 's.db'}", spec(lr_rounds=1, seeds=2, overrides=TINY | {"max_epochs": 2})
    sweep.run_worker(s, url, heartbeat=1)
    runs = trials(url, s.name) + trials(url, s.name + "|seeds")
    assert len(runs) == 2
    for t in runs:
        history = t.user_attrs["record"]["history"]
        assert len(history) == 2 and t.intermediate_values == {row["epoch"]: row["val_score"] for row in history}


def test_a_worker_keeps_the_best_run_as_a_model_folder(tmp_path):
    # every run is saved; the folder ends up holding the one with the best validation score, nothing else is left
    url, s = f"sqlite:///{tmp_path / 's.db'}", spec(lr_rounds=1, seeds=2)  # a search run, then a seed run
    sweep.run_worker(s, url, heartbeat=1, save_dir=tmp_path / "models")
    records = sweep.records(s, url)  # in the order they ran (one worker): search trials, then the seed run
    target = sweep.model_dir(s, tmp_path / "models")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [target.name]
    best_score = max(r["validation"]["score"] for r in records)
    first_best = next(r for r in records if r["validation"]["score"] == best_score)  # a tie keeps the earlier run
    kept = checkpoint.read_meta(target)
    assert (kept["record"]["lr"], kept["seed"]) == (first_best["lr"], first_best["seed"])
    assert first_best["saved"]["dir"] == str(target)
    assert all(r["saved"]["dir"] in (str(target), None) for r in records)
    assert all(r["saved"]["bytes"] > r["saved"]["weights_bytes"] > 0 for r in records)
