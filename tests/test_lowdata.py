"""The low-data study: fraction arithmetic, study names, a tiny real study in a SQLite storage (resume, table values
against the stored records) and the verdict on hand-made tables.

The real runs are READ and BitFit on MiniLM (quick profile: its 256-example ``max_train`` is the pool), 8 and 16
SST-2 training examples, 8 validation and test examples, 2 epochs.
"""

import optuna
import pandas as pd
import pytest

from readlib import lowdata, report
from readlib.errors import ConfigError


def test_fraction_to_examples():
    assert lowdata.pool_size("sst2") == 4000  # the default profile's max_train cap
    assert lowdata.pool_size("rte") == 2490  # RTE's whole training split is smaller than the cap
    assert lowdata.pool_size("sst2", "quick") == 256
    assert lowdata.pool_size("sst2", "paper") == 67349 - 1000  # no cap: the paper split's train (1k held out)
    assert [lowdata.train_size(f, 4000) for f in lowdata.FRACTIONS] == [40, 400, 4000]
    assert [lowdata.train_size(f, 2490) for f in lowdata.FRACTIONS] == [25, 249, 2490]
    assert lowdata.train_size(0.01, 16) == 1  # round(0.16) = 0, at least one example
    assert lowdata.train_size(0.1, 16) == 2  # round(1.6)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, "0.1"])
def test_a_fraction_outside_0_1_is_a_config_error(fraction):
    with pytest.raises(ConfigError, match="fraction must be in"):
        lowdata.train_size(fraction, 4000)


@pytest.mark.parametrize("changes, needle", [
    ({"fractions": (0.1, 0.1)}, "fractions repeat"),
    ({"fractions": (0.1, 2.0)}, "fraction must be in"),
    ({"methods": ("read", "nosuch")}, "nosuch"),
    ({"tasks": ()}, "needs a task"),
    ({"seeds": 0}, "seeds must be >= 1"),
    ({"full_seeds": 0}, "full_seeds must be >= 1"),
    ({"max_epochs": 0}, "max_epochs must be >= 1"),
])
def test_bad_study_input_fails_before_any_model(changes, needle, monkeypatch):
    monkeypatch.setattr(lowdata.sweep, "fit", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match=needle):
        lowdata.specs(**({"tasks": ["sst2"]} | changes))


def test_study_names_differ_per_fraction_only_by_the_training_size():
    study = lowdata.specs(["sst2", "cola"], ["read", "full"], (1.0, 0.01, 0.1))
    assert len({s.name for s in study}) == len(study) == 12
    assert [(s.overrides["max_train"], s.task, s.method) for s in study[:4]] == [
        (40, "sst2", "read"), (40, "sst2", "full"), (40, "cola", "read"), (40, "cola", "full")]  # cheapest first
    read = [s for s in study if s.task == "sst2" and s.method == "read"]
    assert [s.overrides["max_train"] for s in read] == [40, 400, 4000]
    assert [s.seeds for s in read] == [3, 3, 1]  # one seed at 100 %
    parts = [set(s.name.split("|")) for s in read]
    assert parts[0] ^ parts[1] == {"max_train=40", "max_train=400"}  # nothing else differs
    assert "max_epochs=10" in parts[0] and "patience=3" in parts[0]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """READ and BitFit at 1/32 and 1/16 of the quick profile's 256 examples: 4 experiments x (1 search run + 1 seed
    run), run once for the module."""
    url = f"sqlite:///{tmp_path_factory.mktemp('lowdata') / 's.db'}"
    study = lowdata.specs(["sst2"], ["read", "bitfit"], (1 / 32, 1 / 16), "quick", lr_rounds=1, seeds=2,
                          max_epochs=2, patience=2, max_eval=8)
    ran = lowdata.run(study, url)
    return study, url, ran


def test_tiny_study_runs_and_resumes_without_a_new_trial(tiny_study):
    study, url, ran = tiny_study
    assert ran == 8
    assert [s.overrides["max_train"] for s in study] == [8, 8, 16, 16]

    def trials():
        return sorted((s.study_name, t.number, t.state.name) for s in optuna.get_all_study_summaries(url)
                      for t in optuna.load_study(study_name=s.study_name, storage=url).get_trials())

    before = trials()
    assert len(before) == 8 and {state for *_, state in before} == {"COMPLETE"}
    assert lowdata.run(study, url) == 0  # everything finished: skipped
    assert trials() == before


def test_table_values_are_the_stored_records(tiny_study):
    study, url, _ = tiny_study
    table = lowdata.table(study, url)
    assert list(table["method"]) == ["read", "bitfit", "read", "bitfit"]
    assert list(table["n_train"]) == [8, 8, 16, 16]
    assert list(table["fraction"]) == [1 / 32, 1 / 32, 1 / 16, 1 / 16]
    for spec, row in zip(study, table.itertuples(), strict=True):
        runs = sorted(lowdata.sweep.records(spec, url), key=lambda r: r["seed"])
        assert [r["seed"] for r in runs] == row.seeds == [0, 1]
        assert all(r["data"]["sizes_used"]["train"] == row.n_train for r in runs)
        best_epochs, flops = [], []
        for r in runs:  # the best epoch by hand: the first epoch with the highest validation score
            scores = [h["val_score"] for h in r["history"]]
            best = scores.index(max(scores))
            best_epochs.append(best + 1)
            flops.append(r["history"][best]["train_flops"])
            assert r["history"][best]["train_flops"] > 0
        assert row.epochs_to_best == pytest.approx(sum(best_epochs) / 2)
        assert row.flops_to_best == pytest.approx(sum(flops) / 2, rel=1e-12)
        assert row.lr == runs[0]["lr"] == lowdata.sweep.default_lr(spec.method)  # one round: the default
        val = [100 * r["validation"]["score"] for r in runs]
        test = [100 * r["test"]["score"] for r in runs]
        assert row.val_mean == pytest.approx(sum(val) / 2) and row.test_mean == pytest.approx(sum(test) / 2)
        assert row.test_std == pytest.approx(abs(test[0] - test[1]) / 2 ** 0.5)
        assert row.epochs_run == pytest.approx(sum(len(r["history"]) for r in runs) / 2)
    # READ fills its cache once (a forward pass), then trains a small side network: fewer FLOPs per epoch
    flops_per_epoch = table["flops_to_best"] / table["epochs_to_best"]
    assert flops_per_epoch[0] < flops_per_epoch[1] and flops_per_epoch[2] < flops_per_epoch[3]
    # the same table from the storage's records (any study in it, grouped by study)
    from_records = lowdata.table(report.stored_records(url))
    pd.testing.assert_frame_equal(from_records, table)


def hand_table(read_epochs, read_flops):
    """READ (81 points) against full and LoRA (80 points each) at one fraction of SST-2: full 3 epochs / 1e14 FLOPs,
    LoRA 5 / 6e13."""
    rows = [("read", read_epochs, read_flops), ("full", 3.0, 1e14), ("lora", 5.0, 6e13)]
    return pd.DataFrame([{"task": "sst2", "method": m, "fraction": 0.01, "n_train": 40, "lr": 1e-3,
                          "val_mean": 81.0 if m == "read" else 80.0,
                          "val_std": 1.0, "test_mean": 79.0, "test_std": 1.0, "epochs_to_best": e,
                          "flops_to_best": f, "epochs_run": e + 3, "seeds": [0, 1, 2]} for m, e, f in rows],
                        columns=lowdata.COLUMNS)


def test_verdict_more_epochs_but_fewer_flops():
    text = lowdata.verdict(hand_table(read_epochs=7.0, read_flops=2e13))
    assert ("sst2 at 1 % (40 examples): READ reached its best validation epoch (81.0 points) after 7 epochs "
            "(mean over 3 seed(s)), more than full fine-tuning (3; 80.0 points, 3 seed(s)), more than LoRA (5;") in text
    assert "below full fine-tuning's 1e+14 (0.2x), below LoRA's 6e+13 (0.33x)" in text
    assert "more epochs to its best in 2 of 2 comparisons, and reached it with fewer training FLOPs in 2 of 2" in text
    assert "did not erase" in text


def test_verdict_fewer_epochs_but_more_flops():
    text = lowdata.verdict(hand_table(read_epochs=4.0, read_flops=8e13))
    assert "fewer than LoRA (5; 80.0 points" in text and "more than full fine-tuning (3; 80.0 points" in text
    assert "below full fine-tuning's 1e+14 (0.8x), not below LoRA's 6e+13 (1.3x)" in text
    assert "more epochs to its best in 1 of 2 comparisons, and reached it with fewer training FLOPs in 1 of 2" in text
    assert "in 1 of 2 its cheaper steps were outweighed" in text


def test_verdict_without_read_says_so():
    table = hand_table(read_epochs=4.0, read_flops=8e13)
    assert "No READ result" in lowdata.verdict(table[table["method"] != "read"])
    assert "no other method" in lowdata.verdict(table[table["method"] == "read"])
