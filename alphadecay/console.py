"""The console scripts `pip install` puts on the PATH (pyproject.toml [project.scripts]), each the same as its
`python -m` form:

    alphadecay-esd PATH ...          = python -m alphadecay.esd PATH ...
    alphadecay-evaluate PATH ...     = python -m alphadecay.evaluate PATH ...
    alphadecay-plot RUN_DIR ...      = python -m alphadecay.plot RUN_DIR ...
    alphadecay-pretokenize ...       = python -m alphadecay.pretokenize ...

The library (`alphadecay.wd`) needs torch and numpy only; the command lines need the `cli` extra (transformers,
datasets, matplotlib, ...). A script whose extra is missing says which package and how to install it.
"""

from __future__ import annotations

import importlib
import sys


def _run(script: str, module: str) -> int:
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as err:
        if not err.name or err.name.split(".")[0] == "alphadecay":
            raise
        print(f"error: {script} needs the package {err.name.split('.')[0]!r}, which is not installed; install the "
              f"command lines' dependencies with: pip install 'alphadecay[cli]' (from a checkout: pip install "
              f"'.[cli]').", file=sys.stderr)
        return 2
    return main()


def esd() -> None:
    sys.exit(_run("alphadecay-esd", "alphadecay.esd.report"))


def evaluate() -> None:
    sys.exit(_run("alphadecay-evaluate", "alphadecay.evaluate"))


def plot() -> None:
    sys.exit(_run("alphadecay-plot", "alphadecay.plot"))


def pretokenize() -> None:
    sys.exit(_run("alphadecay-pretokenize", "alphadecay.pretokenize"))
