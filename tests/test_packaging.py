"""The package as a whole: dependency ranges and their pins (constraints.txt), and the import graph (acyclic, lower
layers never import higher ones, no readlib import inside a function).
"""

import ast
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PACKAGE = Path(__file__).resolve().parents[1] / "readlib"


# lowest first; a module imports only from its own layer or below (its own layer without a cycle)
LAYERS = [
    {"readlib", "errors", "paths", "paper", "notebook"},
    {"data", "metrics", "backbones", "costs", "derivation", "quantize"},
    {"methods", "cache"},
    {"params", "checkpoint"},
    {"train"},
    {"sweep", "scaling", "serve", "lowdata"},
    {"report", "verdict"},
    {"__main__"},
]


LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = ("readlib", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    """The layer-table name of a readlib module: readlib.methods.read -> methods."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "readlib"


def readlib_imports(node: ast.AST, known: set[str]) -> list[tuple[str, int]]:
    """(imported readlib module, line) for each import statement directly under ``node``'s subtree."""
    out = []
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            out += [(a.name, child.lineno) for a in child.names if a.name.split(".")[0] == "readlib"]
        elif isinstance(child, ast.ImportFrom) and (child.module or "").split(".")[0] == "readlib":
            for alias in child.names:  # "from readlib import data" imports the module readlib.data
                sub = f"{child.module}.{alias.name}"
                out.append((sub if sub in known else child.module, child.lineno))
    return out


def graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> readlib modules it imports at module level, module -> imports found inside functions)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges, inside = {}, {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {line for f in functions for _, line in readlib_imports(f, set(files))}
        found = readlib_imports(tree, set(files))
        edges[name] = {m for m, line in found if line not in nested and m != name}
        inside[name] = [f"{m} (line {line})" for m, line in found if line in nested]
    return edges, inside


def test_every_module_has_a_layer():
    edges, _ = graph()
    assert sorted(group(m) for m in edges if group(m) not in LAYER) == []


def test_no_lower_layer_imports_a_higher_one():
    edges, _ = graph()
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets if LAYER[group(b)] > LAYER[group(a)]]
    assert upward == []


def test_import_graph_is_acyclic():
    edges, _ = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_readlib_import_inside_a_function():
    _, inside = graph()
    assert {m: found for m, found in inside.items() if found} == {}


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a metrics -> train import and a data <-> metrics cycle are found."""
    pkg = tmp_path / "readlib"
    pkg.mkdir()
    (pkg / "metrics.py").write_text("from readlib import train\nfrom readlib.data import x\n")
    (pkg / "data.py").write_text("import readlib.metrics\n\ndef f():\n    from readlib import params\n")
    (pkg / "train.py").write_text("")
    (pkg / "params.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    edges, inside = graph()
    assert edges["readlib.metrics"] == {"readlib.train", "readlib.data"}
    assert edges["readlib.data"] == {"readlib.metrics"}
    assert inside["readlib.data"] == ["readlib.params (line 4)"]
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_import_graph_is_acyclic()
    with pytest.raises(AssertionError):
        test_no_lower_layer_imports_a_higher_one()


def test_every_import_inside_a_function_says_why():
    """Heavy optional dependencies may be imported where they are needed, each under a one-line reason."""
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                above = node.lineno - 2  # the statement's own line is lineno - 1
                while above >= 0 and lines[above].lstrip().startswith(("import ", "from ")):
                    above -= 1  # a run of imports shares one reason
                if "#" not in lines[node.lineno - 1] and not lines[above].lstrip().startswith("#"):
                    unexplained.append(f"{path.name}:{node.lineno}")
    assert unexplained == []


ROOT = Path(__file__).resolve().parents[1]


def constraint_pins(text: str) -> dict[str, str]:
    """A constraints file as {canonical name: exact version}; anything but ``name==version`` fails."""
    out = {}
    for line in text.splitlines():
        line = line.partition("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and not requirement.extras and not requirement.marker, line
            out[canonicalize_name(requirement.name)] = spec.version
    return out


def pyproject_requirements() -> dict[str, list[Requirement]]:
    """Runtime dependencies and each extra: {"runtime" | extra name: requirements}."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"runtime": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(spec) for spec in specs] for group, specs in groups.items()}


def unpinned(groups: dict[str, list[Requirement]], pins: dict[str, str]) -> list[str]:
    """Requirements with no pin, or whose range does not admit the pin."""
    problems = []
    for group, requirements in groups.items():
        for requirement in requirements:
            pin = pins.get(canonicalize_name(requirement.name))
            if pin is None:
                problems.append(f"{group}: {requirement} has no pin")
            elif not requirement.specifier.contains(pin, prereleases=True):
                problems.append(f"{group}: {requirement} does not admit the pin {pin}")
    return problems


PINS = constraint_pins((ROOT / "constraints.txt").read_text())


def test_every_dependency_and_extra_has_a_pin_that_its_range_admits():
    groups = pyproject_requirements()
    assert {"runtime", "dev", "notebooks", "postgres"} <= set(groups)
    assert unpinned(groups, PINS) == []
    assert {"ipywidgets", "psycopg", "nvidia-ml-py"} <= set(PINS)


def test_the_pin_check_sees_a_missing_pin_and_one_out_of_range():
    groups = {"runtime": [Requirement("torch>=2.6"), Requirement("numpy<3")]}
    assert unpinned(groups, {"torch": "2.5.1"}) == ["runtime: torch>=2.6 does not admit the pin 2.5.1",
                                                     "runtime: numpy<3 has no pin"]


def test_dependencies_are_ranges_not_pins():
    pinned = [str(r) for reqs in pyproject_requirements().values() for r in reqs
              if any(spec.operator in ("==", "===") for spec in r.specifier)]
    assert pinned == []


def test_an_existing_cuda_torch_is_kept():
    """readlib installed into an environment with a CUDA build of torch leaves it there: the range admits it."""
    torch = next(r for r in pyproject_requirements()["runtime"] if r.name == "torch").specifier
    for version in ("2.6.0+cu124", "2.8.0+cu128", "2.13.0", "2.13.0+cpu", PINS["torch"]):
        assert torch.contains(version), version
    assert not torch.contains("2.5.1+cu121")  # transformers 5 disables itself on torch < 2.6


def test_environment_yml_lists_the_constraints_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    specs = [line for line in pip_section if not line.startswith("-e ")]
    assert constraint_pins("\n".join(specs)) == PINS and len(specs) == len(PINS)
    assert pip_section[-1] == "-e .[dev,notebooks]"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert project["requires-python"] == ">=" + python.partition("=")[2]


def test_torch_is_installed_pinned_first_then_the_rest_under_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    torch = f"pip install --quiet torch=={PINS['torch']}"
    rest = 'pip install --quiet -c constraints.txt -e ".[dev,notebooks]"'
    assert torch in makefile and rest in makefile
    assert makefile.index(torch) < makefile.index(rest)
