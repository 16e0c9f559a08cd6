"""`pip install .`: a wheel built from pyproject.toml (offline: no build isolation, no index) holds the whole package
(the weight-decay methods included) and the four console scripts; installed outside the repository it gives
`import alphadecay.wd` without transformers, and the scripts run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from alphadecay import console
from tests.conftest import REPO

SCRIPTS = {"alphadecay-esd": "alphadecay.console:esd", "alphadecay-evaluate": "alphadecay.console:evaluate",
           "alphadecay-plot": "alphadecay.console:plot", "alphadecay-pretokenize": "alphadecay.console:pretokenize"}

# Run outside the repository: the library's names load, and a model-wise scheduler runs, with the command lines'
# and the integrations' packages made unimportable.
LIBRARY_ONLY = """
import json, sys
for name in ("transformers", "datasets", "matplotlib", "accelerate", "pytorch_lightning", "tokenizers"):
    sys.modules[name] = None
import torch
import alphadecay.wd as wd
assert "site-packages" not in wd.__file__ and "{repo}" not in wd.__file__, wd.__file__
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
optimizer = torch.optim.AdamW(wd.module_param_groups(model, weight_decay=0.1), lr=1e-3)
scheduler = wd.create("alphadecay", model, optimizer)
scheduler.step()
print(json.dumps({"methods": sorted(wd.available()), "tuned": len(scheduler.rule.modules), "file": wd.__file__}))
"""


def test_the_wheel_installs_the_package_and_console_scripts_offline(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "alphadecay", source / "alphadecay", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index",
                                  "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("alphadecay-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    expected = {os.path.relpath(os.path.join(d, f), REPO).replace(os.sep, "/")
                for d, _, files in os.walk(REPO / "alphadecay") for f in files if f.endswith(".py")}
    assert {n for n in names if n.endswith(".py")} == expected
    assert {"alphadecay/wd/methods/awd.py", "alphadecay/integrations/hf.py", "alphadecay/console.py"} <= names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points

    target = tmp_path / "installed"
    installed = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    library = subprocess.run([sys.executable, "-c", LIBRARY_ONLY.replace("{repo}", str(REPO))], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert library.returncode == 0, library.stderr
    result = json.loads(library.stdout)
    assert {"uniform", "awd", "adadecay", "alphadecay"} <= set(result["methods"]) and result["tuned"] == 2
    assert result["file"] == str(target / "alphadecay" / "wd" / "__init__.py")
    running = {script: subprocess.Popen([str(target / "bin" / script), "--help"], cwd=tmp_path, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in SCRIPTS}
    for script, process in running.items():  # side by side: each imports torch and transformers
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.startswith("usage:"), (script, err)


def test_a_console_script_without_its_extra_says_what_to_install(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(console.importlib, "import_module", missing)
    with pytest.raises(SystemExit) as stop:
        console.plot()
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: alphadecay-plot needs the package 'matplotlib', which is not installed; "
                                       "install the command lines' dependencies with: pip install 'alphadecay[cli]' "
                                       "(from a checkout: pip install '.[cli]').\n")
