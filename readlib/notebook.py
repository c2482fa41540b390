"""A misspelled papermill parameter becomes an error: papermill only warns about a ``-p`` name the notebook's
``parameters`` cell does not define, then runs the notebook on its defaults.

papermill inserts its ``injected-parameters`` cell right after the ``parameters`` cell. So the ``parameters`` cell
starts with ``notebook.mark_parameters()``, which records the names defined so far and the names the cell assigns,
and the next cell starts with ``notebook.check_parameters()``, which raises on any other new name: one that only
the injected cell can have defined. In JupyterLab a check consumes its mark, so re-running the check cell, or
re-running the parameters cell after later cells, passes.
"""

import ast
import linecache
import sys
from dataclasses import dataclass
from typing import Any

from readlib.errors import ConfigError

MARK = "_readlib_parameters"  # where mark_parameters() leaves its Mark in the namespace ("_": never a parameter)
PAPERMILL_NAMES = {"PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH"}  # papermill --inject-paths defines these


@dataclass(frozen=True)
class Mark:
    """The names a notebook defines: those before its parameters cell, and the parameters (in cell order)."""

    names: frozenset[str]
    parameters: tuple[str, ...]


class UnknownParameterError(ConfigError):
    """A name papermill injected that the notebook's parameters cell does not define (a misspelled ``-p``)."""

    def __init__(self, unknown: list[str], parameters: tuple[str, ...]):
        names = ", ".join(repr(name) for name in unknown)
        which = f"parameter {names} is" if len(unknown) == 1 else f"parameters {names} are"
        super().__init__(f"notebook {which} not defined by this notebook; its parameters: {', '.join(parameters)}")

    def _render_traceback_(self) -> list[str]:
        """IPython (and so papermill's error report) shows this one line instead of a traceback."""
        return [f"readlib: error: {self}"]


def assigned_names(source: str) -> tuple[str, ...]:
    """The names a cell's top-level assignments bind, in order: its parameters."""
    names: dict[str, None] = {}
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        elif isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        else:
            continue
        for target in targets:
            names.update((n.id, None) for n in ast.walk(target) if isinstance(n, ast.Name))
    return tuple(names)


def mark_parameters(namespace: dict[str, Any] | None = None, source: str | None = None) -> None:
    """Record the names defined before the parameters cell and the parameters it assigns.

    Call it at the top of the ``parameters`` cell. ``namespace`` defaults to the caller's globals (in IPython: the
    kernel's user namespace), ``source`` to the caller's source (in IPython: the running cell).
    """
    caller = sys._getframe(1)
    namespace = caller.f_globals if namespace is None else namespace
    if source is None:
        source = "".join(linecache.getlines(caller.f_code.co_filename))
        if not source:  # e.g. code run from a string: every parameter would read as unknown
            raise ValueError(f"mark_parameters: no source for {caller.f_code.co_filename}; pass source=")
    parameters = assigned_names(source)
    namespace[MARK] = Mark(frozenset(namespace) | set(parameters), parameters)


def check_parameters(namespace: dict[str, Any] | None = None) -> None:
    """Raise UnknownParameterError if a name appeared since mark_parameters() that the parameters cell does not
    define; call it first in the cell after the ``parameters`` cell. Without a pending mark it does nothing.

    ``namespace`` defaults to the caller's globals (in IPython: the kernel's user namespace).
    """
    namespace = sys._getframe(1).f_globals if namespace is None else namespace
    mark = namespace.get(MARK)
    if mark is None:
        return
    unknown = sorted(name for name in namespace
                     if name not in mark.names and not name.startswith("_") and name not in PAPERMILL_NAMES)
    if unknown:  # the mark stays: re-running this cell fails again until the parameters cell is re-run
        raise UnknownParameterError(unknown, mark.parameters)
    del namespace[MARK]
