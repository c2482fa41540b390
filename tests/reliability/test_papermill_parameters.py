"""A misspelled papermill parameter (``-p methd read``) stops the notebook with one line, before any work; papermill
alone only warns and runs on the defaults."""

import ast
import json
import linecache
import re
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from readlib import notebook
from readlib.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
SINGLE_TASK = ROOT / "notebooks" / "02_single_task.ipynb"


def source(cell: dict) -> str:
    return "".join(cell["source"])


def parameters_and_check(cells: list[dict]) -> tuple[int, int]:
    """(index of the ``parameters`` cell, index of the first code cell after it)."""
    i = next(i for i, cell in enumerate(cells) if "parameters" in cell["metadata"].get("tags", []))
    return i, next(j for j in range(i + 1, len(cells)) if cells[j]["cell_type"] == "code")


def run_papermill(input_path: Path, output_path: Path, *args: str) -> subprocess.CompletedProcess:
    """papermill as `make reproduce` runs it (from the repository root, kernel in notebooks/)."""
    command = [sys.executable, "-m", "papermill", str(input_path), str(output_path), *args, "--cwd", "notebooks"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


# --- the notebooks: mark first in the parameters cell, check first in the next code cell ---

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_marks_its_parameters_checks_them_next_and_papermill_sees_them_all(path):
    cells = json.loads(path.read_text())["cells"]
    i, j = parameters_and_check(cells)
    first_two = [ast.unparse(s) for s in ast.parse(source(cells[i])).body[:2]]
    assert first_two == ["from readlib import notebook", "notebook.mark_parameters()"]
    assert ast.unparse(ast.parse(source(cells[j])).body[0]) == "notebook.check_parameters()"
    # papermill's line-based parser (--help-notebook) sees no mark line and still reads every default intact
    cell = source(cells[i])
    assigned = {s.targets[0].id: ast.get_source_segment(cell, s.value) for s in ast.parse(cell).body
                if isinstance(s, ast.Assign)}
    inferred = {name: p["default"] for name, p in papermill.inspect_notebook(str(path)).items()}
    assert inferred == assigned
    assert list(inferred) == list(notebook.assigned_names(cell))  # in cell order, as the error lists them


# --- real papermill runs ---

def test_a_misspelled_parameter_stops_papermill_in_the_cell_after_the_injected_one(tmp_path):
    out = tmp_path / "out.ipynb"
    run = run_papermill(SINGLE_TASK, out, "-p", "methd", "read")
    cells = json.loads(SINGLE_TASK.read_text())["cells"]
    parameters = ", ".join(notebook.assigned_names(source(cells[parameters_and_check(cells)[0]])))
    line = f"readlib: error: notebook parameter 'methd' is not defined by this notebook; its parameters: {parameters}"
    assert run.returncode != 0
    assert line in run.stderr.splitlines()

    ran = json.loads(out.read_text())["cells"]
    injected = next(k for k, cell in enumerate(ran) if "injected-parameters" in cell["metadata"].get("tags", []))
    code = [k for k, cell in enumerate(ran) if cell["cell_type"] == "code"]
    check = next(k for k in code if k > injected)
    (error,) = [o for o in ran[check]["outputs"] if o["output_type"] == "error"]
    assert error["ename"] == "UnknownParameterError" and error["traceback"] == [line]
    assert [ran[k]["execution_count"] for k in code if k > check] == [None] * len([k for k in code if k > check])
    assert not any(ran[k]["outputs"] for k in code if k > check)  # no training cell ran


def test_a_defined_parameter_passes_the_check(tmp_path):
    """02 cut after its check statement (no model is loaded): -p method lora and papermill's own path names pass."""
    nb = json.loads(SINGLE_TASK.read_text())
    _, j = parameters_and_check(nb["cells"])
    check = nb["cells"][j]
    assert check["source"][0].startswith("notebook.check_parameters()")
    check["source"] = [check["source"][0], "assert method == \"lora\" and seed == 3\n"]
    nb["cells"] = nb["cells"][:j + 1]
    cut = tmp_path / "02_cut.ipynb"
    cut.write_text(json.dumps(nb))
    out = tmp_path / "out.ipynb"
    run = run_papermill(cut, out, "-p", "method", "lora", "-p", "seed", "3", "--inject-paths")
    assert run.returncode == 0, run.stderr[-2000:]
    warned = [line for line in run.stderr.splitlines() if line.startswith("Passed unknown parameter: ")]
    assert [line.split(": ")[1] for line in warned] == ["PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH"]
    ran = json.loads(out.read_text())["cells"]
    assert ran[-1]["execution_count"] is not None and ran[-1]["outputs"] == []


# --- readlib.notebook without a kernel ---

def run_cell(namespace: dict, text: str, tag: str, monkeypatch) -> None:
    """Run ``text`` the way IPython runs a cell: compiled under its own file name, its source in linecache."""
    filename = f"<cell {tag}>"
    monkeypatch.setitem(linecache.cache, filename, (len(text), None, text.splitlines(True), filename))
    exec(compile(text, filename, "exec"), namespace)


PARAMETERS_CELL = 'from readlib import notebook\nnotebook.mark_parameters()\ntask = "mrpc"  # GLUE\nmethod = "read"\n'


def test_the_cells_flow_finds_a_misspelled_injected_name_from_the_callers_globals_and_source(monkeypatch):
    namespace = {"In": [], "get_ipython": None}
    run_cell(namespace, PARAMETERS_CELL, 1, monkeypatch)
    run_cell(namespace, '# Parameters\nmethd = "lora"\n', 2, monkeypatch)
    with pytest.raises(notebook.UnknownParameterError) as raised:
        run_cell(namespace, "notebook.check_parameters()\n", 3, monkeypatch)
    message = "notebook parameter 'methd' is not defined by this notebook; its parameters: task, method"
    assert str(raised.value) == message
    assert raised.value._render_traceback_() == [f"readlib: error: {message}"]
    assert isinstance(raised.value, ConfigError)


def test_a_defined_parameter_passes_and_the_check_consumes_its_mark(monkeypatch):
    namespace = {}
    run_cell(namespace, PARAMETERS_CELL, 1, monkeypatch)
    run_cell(namespace, 'method = "lora"\n', 2, monkeypatch)
    run_cell(namespace, "notebook.check_parameters()\nresult = method\n", 3, monkeypatch)
    assert namespace["result"] == "lora" and notebook.MARK not in namespace
    # JupyterLab: the check cell again after later cells, then the parameters cell and the check again
    run_cell(namespace, "notebook.check_parameters()\n", 3, monkeypatch)
    run_cell(namespace, PARAMETERS_CELL, 1, monkeypatch)
    run_cell(namespace, "notebook.check_parameters()\n", 3, monkeypatch)


def test_every_unknown_name_is_listed_sorted_and_the_mark_stays_until_the_parameters_cell_reruns():
    namespace = {"notebook": notebook, "In": []}
    notebook.mark_parameters(namespace, source="task = 'mrpc'\nlr: float | None = None\na, (b, c) = 1, (2, 3)\n")
    namespace.update(tsk="x", methd="y", task="sst2", _private=1, PAPERMILL_INPUT_PATH="in.ipynb")
    message = ("notebook parameters 'methd', 'tsk' are not defined by this notebook; its parameters: "
               "task, lr, a, b, c")
    for _ in range(2):  # a failed check keeps its mark: running the check cell again fails again
        with pytest.raises(notebook.UnknownParameterError, match=f"^{re.escape(message)}$"):
            notebook.check_parameters(namespace)
    notebook.mark_parameters(namespace, source="task = 'mrpc'\n")  # the user accepts the names as they are
    notebook.check_parameters(namespace)


def test_a_check_without_a_mark_does_nothing_and_a_mark_without_source_says_so():
    namespace = {"anything": 1}
    notebook.check_parameters(namespace)
    with pytest.raises(ValueError, match="no source for <string>; pass source="):
        exec(compile("from readlib import notebook\nnotebook.mark_parameters()\n", "<string>", "exec"), {})


def test_assigned_names_are_the_top_level_assignment_targets_in_order():
    text = "import os\nx = 1\ny: int = 2\nx = 3\nz += 1\nfor i in []:\n    w = 0\nprint(x)\n"
    assert notebook.assigned_names(text) == ("x", "y")
