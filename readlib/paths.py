"""Every path readlib reads from or writes to, in one place.

Inputs ship with the repository (YAML profiles, the bundled GLUE data); everything generated goes under
``OUTPUT_DIR`` (tables, figures, result records, the hidden-state cache, the study storage). Modules read
``paths.OUTPUT_DIR`` when they write, so tests can point it at a temporary folder.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "params"
BUNDLED_GLUE = REPO_ROOT / "data" / "glue"
OUTPUT_DIR = REPO_ROOT / "outputs"


def output(*parts: str) -> Path:
    """A path under the output folder, e.g. ``output("figures", "a.png")``; folders are not created."""
    return OUTPUT_DIR.joinpath(*parts)
