"""Result files never overwrite each other: notebook 02's file name carries a hash of every parameter that changes the
result; a second, different run gets its own file and an identical rerun replaces its own."""

import json

import pandas as pd
import pytest

import readlib.paths
from readlib import report
from readlib.params import make_params, run_id
from readlib.train import fit

TINY = dict(task="rte", method="read", max_train=16, max_eval=8, max_epochs=1, batch_size=8, micro_batch_size=8,
            max_length=32)


def save(record: dict):
    """What notebook 02 does with a finished run."""
    return report.save_record(record, readlib.paths.output("results", f"02_{report.run_name(record)}.json"))


def test_runs_differing_only_in_lr_keep_both_files_and_a_rerun_replaces_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(readlib.paths, "OUTPUT_DIR", tmp_path)
    first = save(fit(make_params("quick", **TINY, lr=1e-3), progress=False))
    second = save(fit(make_params("quick", **TINY, lr=3e-4), progress=False))
    assert first != second and first.exists() and second.exists()
    assert json.loads(first.read_text())["lr"] == 1e-3 and json.loads(second.read_text())["lr"] == 3e-4
    again = save(fit(make_params("quick", **TINY, lr=1e-3), progress=False))
    assert again == first and len(list((tmp_path / "results").iterdir())) == 2


BASE = make_params("quick", **TINY)


@pytest.mark.parametrize("change", [
    {"lr": 3e-4}, {"method_args": {"hidden": 64}}, {"method_args": {"rnn": "lstm"}}, {"max_epochs": 2},
    {"seed": 1}, {"split_seed": 7}, {"max_train": 32}, {"max_length": 48}, {"cache_dtype": "float16"},
    {"weight_decay": 0.01}, {"precision": "bf16"},
])
def test_every_parameter_that_changes_the_result_changes_the_id(change):
    assert run_id(make_params("quick", **(TINY | change)), "sha256:a") != run_id(BASE, "sha256:a")


def test_the_id_spells_out_defaults_and_ignores_what_does_not_change_results():
    assert run_id(make_params("quick", **TINY, lr=BASE.learning_rate)) == run_id(BASE)  # the default lr, written out
    assert run_id(make_params("quick", **TINY, method_args={"hidden": 256})) == run_id(BASE)  # READ's default hidden
    for neutral in ({"cache": "disk"}, {"device": "cpu"}, {"energy_interval": 5.0}):
        assert run_id(make_params("quick", **(TINY | neutral))) == run_id(BASE)


def test_the_same_data_dir_with_other_contents_is_another_run(tmp_path):
    folder = tmp_path / "rte"
    folder.mkdir()
    for split in ("train", "validation"):
        pd.read_parquet(readlib.paths.BUNDLED_GLUE / "rte" / f"{split}.parquet").to_parquet(folder / f"{split}.parquet")
    params = make_params("quick", **TINY, data_dir=str(tmp_path))
    before = run_id(params, readlib.data.revision("rte", tmp_path))
    frame = pd.read_parquet(folder / "train.parquet")
    frame.iloc[:5].to_parquet(folder / "train.parquet")
    assert run_id(params, readlib.data.revision("rte", tmp_path)) != before
    assert run_id(make_params("quick", **TINY), readlib.data.revision("rte")) != before  # bundled vs data_dir
