"""The paper's command lines and our launch scripts: the official scripts' every torchrun line parses with our
parser and means what its folder says; scripts/*.sh print (DRY_RUN=1) commands that parse to the paper's
settings; scripts/make_tables.py turns finished runs into the paper's table layout. No training happens here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alphadecay import config as config_lib
from alphadecay.config import TrainConfig, parse_args

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
OFFICIAL_FILE = REPO / "tests" / "data" / "official_commands.txt"

# official-code.md §1.3: script folder -> method.
FOLDER_METHOD = {"adam": "uniform", "unifrom": "uniform", "baseline1": "awd", "baseline2": "adadecay",
                 "ours": "alphadecay"}
# The environment our scripts read; the tests set it explicitly, never inherit it.
TRAIN_ENV = ("NGPU", "BATCH_SIZE", "SEED", "DATASET", "TOKENIZER", "RUNS_DIR", "RUN_NAME", "TORCHRUN", "DRY_RUN",
             "SMOKE_DIR")
# The method flags exactly as the official scripts pass them (alphadecay's max ratio is added per run).
METHOD_FLAGS = {
    "uniform": [],
    "awd": ["--use_AWD_NeurIPS2023"],
    "adadecay": ["--use_modulewise_wd", "--alpha_positively_with_WD", "--unbalancedWD_every", "500",
                 "--esd_metric_for_tb", "gradnorm", "--assign_func", "layerwise_sigmoid"],
    "alphadecay": ["--use_modulewise_wd", "--alpha_positively_with_WD", "--unbalancedWD_every", "500",
                   "--esd_metric_for_tb", "alpha", "--assign_func", "tb_linear_map", "--wd_min_ratio", "0.6666"],
}
PAPER_STEPS = {"60m": (10000, 1000), "130m": (20000, 2000), "350m": (60000, 6000), "1b": (100000, 10000)}


# --- (a) the official command lines -------------------------------------------------------------------------
def official_commands() -> list[tuple[str, str]]:
    """(script path, arguments) for every line of tests/data/official_commands.txt."""
    lines = [line for line in OFFICIAL_FILE.read_text().splitlines() if line and not line.startswith("#")]
    return [tuple(line.split("\t")) for line in lines]


def official_params() -> list:
    """official_commands() as pytest parameters named <folder path>:<line number within the script>."""
    params, seen = [], {}
    for path, args in official_commands():
        seen[path] = seen.get(path, 0) + 1
        params.append(pytest.param(path, args, id=f"{path.split('scripts/', 1)[1]}:{seen[path]}"))
    return params


def official_meaning(path: str) -> dict:
    """What a script's location says about its runs: method, optimizer, size and weight decay."""
    parts = Path(path).parts[Path(path).parts.index("scripts") + 1:]
    if parts[0] == "Adam":  # Adam/<folder>/<wd>.sh, 130M only
        folder, size, wd = parts[1], "130m", float(Path(parts[2]).stem)
    else:  # Adamw/<folder>/<size>/WD<m>e_<k>.sh or WD0.sh
        folder, size, wd = parts[1], parts[2].lower(), float(Path(parts[3]).stem[2:].replace("_", "-"))
    return {"method": FOLDER_METHOD[folder], "optimizer": parts[0].lower(), "size": size, "wd": wd}


def test_official_command_file_is_complete():
    commands = official_commands()
    per_script: dict[str, int] = {}
    for path, _ in commands:
        per_script[path] = per_script.get(path, 0) + 1
    assert len(commands) == 98 and len(per_script) == 38
    assert all(n == (6 if "/Adam/" in path else 1) for path, n in per_script.items())


@pytest.mark.parametrize("path,args", official_params())
def test_official_command_line_parses_as_its_folder_says(path, args):
    config, given = parse_args(shlex.split(args))
    meaning = official_meaning(path)
    assert config.wd_method() == meaning["method"]
    assert config.optimizer == meaning["optimizer"]
    assert config.model_config == f"configs/llama_{meaning['size']}.json"
    assert config.weight_decay == meaning["wd"]
    assert (config.lr, config.total_batch_size, config.dtype, config.target_eval_tokens) == \
        (1e-3, 512, "bfloat16", 10_000_000)
    assert (config.num_training_steps, config.warmup_steps) == PAPER_STEPS[meaning["size"]]
    if meaning["method"] == "alphadecay":  # 3 only in Adam/ours/1e-5.sh (official-code.md §5 #32)
        assert config.wd_max_ratio == (3.0 if path.endswith("Adam/ours/1e-5.sh") else 5.0)
        assert config.wd_min_ratio == 0.6666
    if meaning["optimizer"] == "adam":  # six repeats per file, seeds 5..10 (the run number is in the name)
        assert config.seed == 4 + int(re.search(r"repeat(\d)$", config.wandb_name).group(1))
    else:
        assert "seed" not in given and config.seed == 0


# --- (b) our launch scripts, dry run --------------------------------------------------------------------------
def run_script(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in TRAIN_ENV}
    return subprocess.run([str(a) for a in args], cwd=REPO, env={**base, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)


def parse_printed(line: str) -> TrainConfig:
    """The torchrun_main.py arguments of one printed command, through the real parser."""
    words = shlex.split(line)
    return parse_args(words[words.index("torchrun_main.py") + 1:])[0]


def train_dry_run(method: str, optimizer: str, size: str, wd: str, *extra: str, **env: str) -> tuple[str, TrainConfig]:
    result = run_script([SCRIPTS / "train.sh", method, optimizer, size, wd, *extra], **env)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    return line, parse_printed(line)


@pytest.mark.parametrize("path,args", official_params())
def test_train_sh_reproduces_each_official_run(path, args):
    """train.sh METHOD OPTIMIZER SIZE WD with the official seed and GPU count gives the official configuration
    (only the run's name and directory differ)."""
    official, _ = parse_args(shlex.split(args))
    meaning = official_meaning(path)
    _, ours = train_dry_run(meaning["method"], meaning["optimizer"], meaning["size"], f"{meaning['wd']:g}",
                            NGPU=str(512 // official.batch_size), SEED=str(official.seed))
    differing = {k for k, v in official.to_dict().items() if ours.to_dict()[k] != v}
    assert differing == {"wandb_name", "save_dir"}


@pytest.mark.parametrize("method", ["uniform", "awd", "adadecay", "alphadecay"])
@pytest.mark.parametrize("optimizer,size,wd", [("adam", "60m", "1e-5"), ("adam", "350m", "5e-6"),
                                               ("adam", "1b", "0.00001"), ("adamw", "130m", "0.05")])
def test_train_sh_settings(method, optimizer, size, wd):
    line, config = train_dry_run(method, optimizer, size, wd, SEED="7", NGPU="4", RUNS_DIR="out")
    assert line.split()[1:3] == ["--standalone", "--nproc_per_node=4"]
    assert (config.wd_method(), config.optimizer, config.model_config, config.weight_decay, config.seed) == \
        (method, optimizer, f"configs/llama_{size}.json", float(wd), 7)
    assert (config.num_training_steps, config.warmup_steps) == PAPER_STEPS[size]
    assert 512 % (config.batch_size * 4) == 0 and config.batch_size <= 128
    assert config.save_dir == f"out/{config.wandb_name}" and "seed7" in config.wandb_name
    assert (config.lr, config.scheduler, config.min_lr_ratio, config.max_length, config.total_batch_size) == \
        (1e-3, "cosine", 0.1, 256, 512)
    assert (config.eval_every, config.target_eval_tokens, config.save_every, config.dtype) == \
        (1000, 10_000_000, 10000, "bfloat16")
    assert (config.dataset, config.tokenizer) == ("allenai/c4", "t5-base")
    words = shlex.split(line)
    flags = words[words.index("--weight_decay") + 2:words.index("--dtype")]
    ratio = "3" if (optimizer, float(wd)) == ("adam", 1e-5) else "5"
    assert flags == METHOD_FLAGS[method] + (["--wd_max_ratio", ratio] if method == "alphadecay" else [])


def test_train_sh_environment_and_overrides():
    _, config = train_dry_run("alphadecay", "adamw", "130m", "0.1", "--num_training_steps", "50",
                              "--warmup_steps", "5", DATASET="/data/c4", TOKENIZER="/data/t5", BATCH_SIZE="64",
                              RUN_NAME="mine")
    assert (config.dataset, config.tokenizer, config.batch_size, config.num_training_steps) == \
        ("/data/c4", "/data/t5", 64, 50)
    assert (config.wandb_name, config.save_dir) == ("mine", "runs/mine")


@pytest.mark.parametrize("args,env,message", [
    (["bogus", "adam", "60m", "1e-5"], {}, "METHOD"), (["uniform", "sgd", "60m", "1e-5"], {}, "OPTIMIZER"),
    (["uniform", "adam", "7b", "1e-5"], {}, "SIZE"), (["uniform", "adam", "60m", "lots"], {}, "WD"),
    (["uniform", "adam", "60m", "1e-5"], {"NGPU": "3"}, "multiple"), (["uniform", "adam"], {}, "Usage")])
def test_train_sh_rejects_bad_input(args, env, message):
    result = run_script([SCRIPTS / "train.sh", *args], **env)
    assert result.returncode == 2 and message in result.stderr and not result.stdout


def sweep_dry_run(*args: str, runs_dir: Path) -> tuple[list[TrainConfig], str]:
    result = run_script([SCRIPTS / "sweep.py", *args], RUNS_DIR=str(runs_dir))
    assert result.returncode == 0, result.stderr
    return [parse_printed(line) for line in result.stdout.splitlines()], result.stderr


def test_sweep_adamw_grid(tmp_path):
    configs, _ = sweep_dry_run("--table", "adamw", "--seeds", "5,6", runs_dir=tmp_path)
    cells = sorted((c.model_config, c.weight_decay, c.wd_method(), c.seed) for c in configs)
    runs = [(0.0, "uniform")] + [(wd, method) for wd in (0.1, 0.05, 0.01) for method in METHOD_FLAGS]
    expected = sorted((f"configs/llama_{size}.json", wd, method, seed)
                      for size in ("60m", "130m") for seed in (5, 6) for wd, method in runs)
    assert cells == expected
    assert {c.optimizer for c in configs} == {"adamw"}


def test_sweep_adam_grid_skips_finished_and_resumes_checkpointed(tmp_path):
    configs, _ = sweep_dry_run("--table", "adam", "--seeds", "5", "--sizes", "1b", runs_dir=tmp_path)
    assert len(configs) == 13 and {c.optimizer for c in configs} == {"adam"}
    assert {(c.weight_decay, c.wd_method()) for c in configs} == \
        {(0.0, "uniform")} | {(wd, m) for wd in (1e-5, 5e-6, 1e-6) for m in METHOD_FLAGS}
    finished, partial = Path(configs[0].save_dir), Path(configs[1].save_dir)
    write_run(finished, configs[0], [(configs[0].num_training_steps, 20.0, 19.5)])
    write_run(partial, configs[1], [(1000, 40.0, 39.0)])  # with a checkpoint, model_1
    again, log = sweep_dry_run("--table", "adam", "--seeds", "5", "--sizes", "1b", runs_dir=tmp_path)
    assert len(again) == 12 and "1 already finished" in log
    assert again[0].save_dir == str(partial) and again[0].continue_from == str(partial)
    assert all(c.continue_from is None for c in again[1:])


def test_smoke_sh_dry_run():
    result = run_script([SCRIPTS / "smoke.sh"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    configs = [parse_printed(line) for line in lines[:-1]]
    assert sorted(c.wd_method() for c in configs) == sorted(["uniform", "awd", "adadecay", "alphadecay"] * 2)
    for c in configs:
        assert (c.model_config, c.dataset, c.tokenizer, c.device, c.dtype) == \
            ("configs/llama_1m.json", "data/c4_sample", "data/tokenizer", "cpu", "float32")
        assert 5 <= c.num_training_steps <= 10 and c.unbalancedWD_every == 2
        assert c.total_batch_size % c.batch_size == 0
    assert lines[-1].split()[1:] == ["scripts/make_tables.py", "runs/smoke"]


def test_compare_methods_dry_run_runs_every_method_at_its_grid_then_three_new_seeds():
    result = run_script([sys.executable, SCRIPTS / "compare_methods.py"])
    assert result.returncode == 0, result.stderr
    configs = [parse_printed(line) for line in result.stdout.splitlines()]
    compare = load_compare_methods()
    methods = list(compare.PAPER + compare.NEWER)
    sweep = [c for c in configs if c.seed == 0]
    assert sorted((c.wd_method(), c.weight_decay) for c in sweep) == \
        sorted((m, d) for m in methods for d in compare.DECAY_GRIDS[m])
    runs = [c for c in configs if c.seed != 0]
    assert sorted((c.wd_method(), c.seed) for c in runs) == sorted((m, s) for m in methods for s in (1, 2, 3))
    for c in configs:
        assert (c.model_config, c.dataset, c.tokenizer, c.optimizer, c.lr) == \
            ("configs/llama_3m.json", "data/c4_sample", "data/tokenizer", "adamw", 3e-3)
        assert c.data_seed == c.seed and c.num_training_steps == 200 and c.save_dir.startswith("runs/methods_cpu/")
    independent = sorted(c.weight_decay / c.lr for c in sweep if c.wd_method() == "independent")
    assert independent == pytest.approx(sorted(c.weight_decay for c in sweep if c.wd_method() == "uniform"))


def load_compare_methods():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPTS / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_methods_table_says_which_differences_exceed_the_seed_spread(tmp_path):
    compare = load_compare_methods()
    args, _ = compare.parse_args(["--methods", "uniform,cautious,swd", "--seeds", "1,2,3"])
    final = {"uniform": [100.0, 102.0, 98.0], "cautious": [95.0, 96.0, 94.0], "swd": [99.0, 103.0, 97.0]}
    results = {(m, s): {"eval_ppl": v, "eval_ppl_official": v - 10, "train_loss": 4.6, "curve": [[10, 2 * v], [20, v]]}
               for m, values in final.items() for s, v in zip((1, 2, 3), values)}
    sweep = {"uniform": {0.1: 101.0, 0.3: 99.0}, "cautious": {0.3: 96.0, 1.0: 97.0}, "swd": {5e-5: 99.5}}
    chosen = {"uniform": 0.3, "cautious": 0.3, "swd": 5e-5}
    compare.write_table(sweep, chosen, results, args, tmp_path / "table.md", "Time: test.")
    compare.plot(chosen, results, [1, 2, 3], tmp_path / "perplexity.png")
    table = (tmp_path / "table.md").read_text()
    assert ("| Cautious | 0.3 | 95.00 ± 1.00 | 85.00 ± 1.00 | 4.6000 ± 0.0000 | -5.00, -6.00, -4.00 | -5.00 ± 1.00 | "
            "yes | yes |") in table
    assert ("| SWD | 5e-05 | 99.67 ± 3.06 | 89.67 ± 3.06 | 4.6000 ± 0.0000 | -1.00, +1.00, -1.00 | -0.33 ± 1.15 | no | "
            "no |") in table
    assert ("exceed the seed spread: Cautious (-5.00). Within the seed spread but of the same sign at every seed: "
            "none. Within it and of mixed signs: SWD (-0.33).") in table
    assert "| Uniform | 0.1 → 101.00, **0.3 → 99.00** |" in table and "A CPU toy" in table
    assert "at an edge of its grid for Uniform (largest), Cautious (smallest)" in table
    assert (tmp_path / "perplexity.png").stat().st_size > 10_000


# How each shell script under scripts/ is dry-run above; a new script needs an entry (and a test).
DRY_RUN_TESTED = {"train.sh": test_train_sh_settings, "smoke.sh": test_smoke_sh_dry_run}


def test_every_shell_script_has_a_dry_run_test():
    assert {p.name for p in SCRIPTS.glob("*.sh")} == set(DRY_RUN_TESTED)


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*") if p.suffix in (".sh", ".py")))
def test_no_hard_coded_gpus_or_ports(script):
    text = (SCRIPTS / script).read_text()
    assert not re.search(r"CUDA_VISIBLE_DEVICES\s*=|master_port|MASTER_PORT|master_addr", text)


# --- (c) the table maker --------------------------------------------------------------------------------------
def load_make_tables():
    """scripts/make_tables.py as a module (registered first: its dataclass needs sys.modules)."""
    spec = importlib.util.spec_from_file_location("make_tables", SCRIPTS / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_tables"] = module
    spec.loader.exec_module(module)
    return module


def write_run(run_dir: Path, config: TrainConfig, evals: list[tuple[int, float, float]]) -> None:
    """A run directory as the trainer leaves it: config.json, and metrics.jsonl with training events and the
    given (step, eval_ppl, eval_ppl_official) evaluations; plus a checkpoint whose config.json is not a run's."""
    run_dir.mkdir(parents=True)
    config_lib.save(config, str(run_dir / "config.json"))
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for step, ppl, official in evals:
            fh.write(json.dumps({"step": step, "loss": 3.0, "lr": 1e-4}) + "\n")
            fh.write(json.dumps({"step": step, "eval_loss": 3.4, "eval_ppl": ppl,
                                 "eval_loss_official": 3.3, "eval_ppl_official": official}) + "\n")
    (run_dir / "model_1").mkdir()
    (run_dir / "model_1" / "config.json").write_text('{"model_type": "llama"}')


def synthetic_config(optimizer: str, size: str, wd: float, method: str, seed: int, *extra: str) -> TrainConfig:
    args = ["--optimizer", optimizer, "--model_config", f"configs/llama_{size}.json", "--weight_decay", str(wd),
            "--seed", str(seed), "--num_training_steps", "1000", "--warmup_steps", "100", *METHOD_FLAGS[method],
            *extra]
    return parse_args(args)[0]


# (optimizer, size, wd, method, seed, final eval_ppl); eval_ppl_official is always 1 lower.
SYNTHETIC = [
    ("adam", "60m", 1e-5, "uniform", 5, 32.0), ("adam", "60m", 1e-5, "uniform", 6, 32.2),
    ("adam", "60m", 1e-5, "uniform", 7, 32.4),
    ("adam", "60m", 1e-5, "alphadecay", 5, 31.5), ("adam", "60m", 1e-5, "alphadecay", 6, 31.6),
    ("adam", "60m", 1e-5, "alphadecay", 7, 31.7),
    ("adam", "60m", 1e-6, "uniform", 5, 33.0),
    ("adam", "60m", 1e-6, "alphadecay", 5, 33.5), ("adam", "60m", 1e-6, "alphadecay", 6, 33.7),
    ("adam", "60m", 0.0, "uniform", 5, 33.2),
    ("adam", "130m", 1e-5, "awd", 5, 24.3),
    ("adamw", "60m", 0.1, "uniform", 0, 31.95), ("adamw", "60m", 0.1, "alphadecay", 0, 31.2),
]
EXPECTED = """\
## Adam

| Method | 60M, WD 0 | 60M, WD 1e-5 | 60M, WD 1e-6 | 130M, WD 1e-5 |
|---|---:|---:|---:|---:|
| Uniform | 33.20 (n=1) | 32.20 ± 0.20 (n=3) | **33.00** (n=1) | – |
| AWD | – | – | – | 24.30 (n=1) |
| AlphaDecay | – | **31.60 ± 0.10** (n=3) | 33.60 ± 0.14 (n=2) | – |

## AdamW

| Method | 60M, WD 0.1 |
|---|---:|
| Uniform | 31.95 (n=1) |
| AlphaDecay | **31.20** (n=1) |

Final validation perplexity (`eval_ppl`: token-weighted): mean ± sample standard deviation over runs (seeds), \
n = number of runs; the lowest mean in each column is in bold.
"""


@pytest.fixture
def synthetic_runs(tmp_path) -> Path:
    for i, (optimizer, size, wd, method, seed, ppl) in enumerate(SYNTHETIC):
        config = synthetic_config(optimizer, size, wd, method, seed)
        # An earlier, worse evaluation: the table must use the last one (at the final update).
        write_run(tmp_path / "runs" / f"run{i}", config, [(500, ppl + 10, ppl + 9), (1000, ppl, ppl - 1)])
    # Unfinished (last evaluation at 500 of 1000): left out, or the 60M 1e-5 Uniform cell would change.
    write_run(tmp_path / "runs" / "unfinished", synthetic_config("adam", "60m", 1e-5, "uniform", 8),
              [(500, 10.0, 9.0)])
    return tmp_path / "runs"


def test_make_tables_markdown(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "tables.md"
    assert load_make_tables().main([str(synthetic_runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == EXPECTED and out.read_text() == EXPECTED
    assert "unfinished is not finished" in captured.err


def test_make_tables_official_estimator_and_globs(synthetic_runs, capsys):
    assert load_make_tables().main([f"{synthetic_runs}/run[0-5]", "--official"]) == 0
    table = capsys.readouterr().out
    assert "| Uniform | 31.20 ± 0.20 (n=3) |" in table and "| AlphaDecay | **30.60 ± 0.10** (n=3) |" in table
    assert "`eval_ppl_official`" in table and "AdamW" not in table


def test_make_tables_warns_when_a_cell_mixes_settings(tmp_path, capsys):
    for seed, ratio in ((5, "3"), (6, "5")):
        config = synthetic_config("adam", "130m", 1e-5, "alphadecay", seed, "--wd_max_ratio", ratio)
        write_run(tmp_path / f"r{seed}", config, [(1000, 23.0, 22.0)])
    assert load_make_tables().main([str(tmp_path)]) == 0
    assert "differ in wd_max_ratio" in capsys.readouterr().err
