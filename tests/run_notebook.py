"""Runs one colab/ notebook top to bottom in this process, as a fresh kernel would.

    python tests/run_notebook.py colab/own_document.ipynb

Code cells run in order in one namespace; the notebook's last cell assigns `CHECKS` (claim ->
bool computed from its own results). Exit status 0 when every claim holds; otherwise the false
claims are printed and the status is 1 (an exception in a cell propagates with its traceback).
tests/test_notebooks.py runs this in a subprocess with the environment a Colab CPU runtime has:
one CPU device, not the 8 fake devices of the test process (those would replicate the weights
and optimizer state 8 times over).
"""

import json
import os
import pathlib
import sys


def code_cells(path: pathlib.Path) -> list[tuple[str, int]]:
    """Returns (source, cell index) of every code cell, in order."""
    cells = json.loads(path.read_text())["cells"]
    return [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def run(path: pathlib.Path) -> list[str]:
    """Executes the notebook's code cells; returns the names of its false CHECKS."""
    code = code_cells(path)
    if not code:
        raise ValueError(f"{path.name} has no code cells")
    namespace: dict = {"__name__": "__main__"}
    for source, i in code:
        if any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()):
            raise ValueError(f"{path.name} cell {i}: shell/magic lines cannot run outside Jupyter")
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
    checks = namespace.get("CHECKS")
    if not isinstance(checks, dict) or not checks:
        raise ValueError(f"{path.name} defines no CHECKS dict")
    return [name for name, ok in checks.items() if not ok]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/run_notebook.py NOTEBOOK.ipynb", file=sys.stderr)
        return 2
    os.environ.setdefault("MPLBACKEND", "Agg")  # plt.show() is a no-op without a display
    path = pathlib.Path(argv[0]).resolve()
    failed = run(path)
    if failed:
        print(f"{path.name}: checks failed: {failed}", file=sys.stderr)
        return 1
    print(f"{path.name}: all checks hold")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
