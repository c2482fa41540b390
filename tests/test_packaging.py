"""pyproject.toml and environment.yml must pin the same packages at the same versions."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(specs):
    out = {}
    for spec in specs:
        name, sep, version = spec.partition("==")
        if sep:
            out[name.strip().lower()] = version.strip()
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip_section) == pins(project["dependencies"])
    assert len(pins(project["dependencies"])) == len(project["dependencies"]), "every dependency is pinned"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert project["requires-python"] == ">=" + python.partition("=")[2]


def test_torch_is_installed_pinned_first():
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])["torch"]
    assert f"pip install --quiet torch=={torch_pin}" in makefile
    assert makefile.index("torch==") < makefile.index("install --quiet -e .")
