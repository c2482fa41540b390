"""Out-of-range run parameters and bad storage URLs: exit code 2 and one line, before any data or model loads."""

import pytest
from helpers import one_error_line

import readlib.backbones
import readlib.data
from readlib import sweep
from readlib.__main__ import main
from readlib.errors import ConfigError
from readlib.params import check_storage


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("bad input must be refused before any data or model is loaded")

    for module, name in ((readlib.data, "load_task"), (readlib.data, "load_raw"), (readlib.data, "check_available"),
                         (readlib.backbones, "load")):
        monkeypatch.setattr(module, name, refuse)


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    return one_error_line(capsys)


@pytest.mark.parametrize("option, value, needle", [
    ("seed", "-1", "seed must be >= 0, got -1"),
    ("split_seed", "-1", "split_seed must be >= 0, got -1"),
    ("weight_decay", "nan", "weight_decay must be finite and >= 0, got nan"),
    ("weight_decay", "inf", "weight_decay must be finite and >= 0, got inf"),
    ("energy_interval", "nan", "energy_interval must be a finite number of seconds > 0, got nan"),
    ("energy_interval", "inf", "energy_interval must be a finite number of seconds > 0, got inf"),
    ("lr", "nan", "lr must be in (0, 1), got nan"),
])
def test_out_of_range_parameter(capsys, nothing_loads, option, value, needle):
    line = error_line(capsys, ["train", "--task", "rte", "--profile", "quick", f"--{option}", value])
    assert needle in line


@pytest.mark.parametrize("url, needle", [
    ("notaurl", "is not a database URL"),
    ("sqlite:///{tmp}/no/such/folder/studies.db", "does not exist"),
])
def test_bad_storage(capsys, nothing_loads, tmp_path, url, needle):
    url = url.format(tmp=tmp_path)
    line = error_line(capsys, ["worker", "--task", "rte", "--method", "bitfit", "--profile", "quick",
                               "--storage", url])
    assert needle in line and repr(url) in line


def test_storage_without_its_driver_says_what_to_install():
    try:
        import psycopg  # noqa: F401  (the [postgres] extra)
    except ImportError:
        with pytest.raises(ConfigError, match=r"driver is not installed.*readlib\[postgres\]"):
            check_storage("postgresql://user:password@dbhost/readlib")
    else:
        check_storage("postgresql://user:password@dbhost/readlib")


def test_the_notebooks_storage_is_checked_too(nothing_loads, tmp_path):
    spec = sweep.SweepSpec("rte", "bitfit", "quick")
    with pytest.raises(ConfigError, match="is not a database URL"):
        sweep.run_worker(spec, "notaurl")
    with pytest.raises(ConfigError, match="does not exist"):
        sweep.storage(f"sqlite:///{tmp_path}/missing/studies.db")
    check_storage(f"sqlite:///{tmp_path}/studies.db")  # an existing folder: fine (nothing is created)
    assert list(tmp_path.iterdir()) == []
