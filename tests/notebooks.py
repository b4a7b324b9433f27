"""Reading a notebook for tests: its code cells (each checked to parse) and its markdown text."""
from __future__ import annotations

import ast
import json
from pathlib import Path


def read_notebook(path: Path) -> tuple[list[str], str]:
    """`(code cell sources, all markdown joined)`; asserts nbformat 4 and that every cell parses."""
    nb = json.loads(Path(path).read_text())
    assert nb["nbformat"] == 4, f"{path}: nbformat {nb['nbformat']}"
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    for src in code:
        ast.parse(src)
    markdown = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    return code, markdown
