"""The command line: official flags parse with their intended meaning; bad input is a clear UserError."""

import shlex

import pytest

from alphadecay.config import TrainConfig, build_parser, parse_args, parse_token_count
from alphadecay.errors import UserError

# Argument lists exactly as the official hed-ucas/AlphaDecay scripts pass them (torchrun prefix removed).
OFFICIAL = {
    "alphadecay": """--model_config configs/llama_130m.json --optimizer adam --seed 5 --lr 0.001 --batch_size 256
        --total_batch_size 512 --num_training_steps 20000 --warmup_steps 2000 --weight_decay 0.00001
        --use_modulewise_wd --alpha_positively_with_WD --unbalancedWD_every 500 --esd_metric_for_tb alpha
        --assign_func tb_linear_map --wd_min_ratio 0.6666 --wd_max_ratio 3 --dtype bfloat16 --eval_every 1000
        --wandb_name ours-adam-1.5-3unb-130M-lr0.001-WD0.00001-repeat1 --target_eval_tokens 10_000_000 --save_every 10000""",
    "adadecay": """--model_config configs/llama_60m.json --optimizer adamw --lr 0.001 --batch_size 512 --total_batch_size 512
        --num_training_steps 10000 --warmup_steps 1000 --weight_decay 0.1 --use_modulewise_wd --alpha_positively_with_WD
        --unbalancedWD_every 500 --esd_metric_for_tb gradnorm --assign_func layerwise_sigmoid --dtype bfloat16
        --eval_every 1000 --wandb_name baseline2-adamw-60M-lr0.001-WD0.1-10000 --target_eval_tokens 10_000_000
        --save_every 10000""",
    "awd": """--model_config configs/llama_60m.json --optimizer adamw --lr 0.001 --batch_size 512 --total_batch_size 512
        --num_training_steps 10000 --warmup_steps 1000 --use_AWD_NeurIPS2023 --weight_decay 0.1 --dtype bfloat16
        --eval_every 1000 --wandb_name baseline1new-adamw-60M-lr0.001-WD0.1-10000 --target_eval_tokens 10_000_000
        --save_every 10000""",
    "uniform": """--model_config configs/llama_130m.json --optimizer adamw --lr 0.001 --batch_size 256 --total_batch_size 512
        --num_training_steps 20000 --warmup_steps 2000 --weight_decay 0 --dtype bfloat16 --eval_every 1000
        --wandb_name adamw-130M-lr0.001-WD0-20000 --target_eval_tokens 10_000_000 --save_every 10000""",
}


@pytest.mark.parametrize("method", sorted(OFFICIAL))
def test_official_command_lines_select_the_intended_method(method):
    config, _ = parse_args(shlex.split(OFFICIAL[method]))
    assert config.wd_method() == method
    assert config.target_eval_tokens == 10_000_000


def test_official_alphadecay_values():
    config, _ = parse_args(shlex.split(OFFICIAL["alphadecay"]))
    assert (config.use_modulewise_wd, config.alpha_positively_with_WD) == (True, True)
    assert (config.wd_min_ratio, config.wd_max_ratio, config.unbalancedWD_every) == (0.6666, 3.0, 500)
    assert (config.optimizer, config.dtype, config.seed, config.weight_decay) == ("adam", "bfloat16", 5, 1e-5)


def test_defaults_are_uniform_and_official():
    config, given = parse_args([])
    assert given == set()
    assert config.wd_method() == "uniform"
    assert (config.lr, config.batch_size, config.total_batch_size, config.max_length) == (1e-3, 32, 64, 256)
    assert (config.remove_first_layer, config.remove_last_layer, config.filter_zeros) == (True, True, False)


@pytest.mark.parametrize("text,expected", [("--remove_first_layer False", False), ("--remove_first_layer", True),
                                           ("--remove_first_layer=true", True), ("--remove_first_layer 0", False)])
def test_booleans_take_bare_or_explicit_values(text, expected):
    config, _ = parse_args(shlex.split(text))
    assert config.remove_first_layer is expected


def test_wd_scheduler_sets_method_defaults():
    config, _ = parse_args(["--wd_scheduler", "adadecay"])
    assert (config.esd_metric_for_tb, config.assign_func, config.use_modulewise_wd) == ("gradnorm", "layerwise_sigmoid", True)
    config, _ = parse_args(["--wd_scheduler", "alphadecay", "--esd_metric_for_tb", "spectral_norm"])
    assert config.wd_method() == "alphadecay" and config.esd_metric_for_tb == "spectral_norm"
    config, _ = parse_args(["--wd_scheduler", "awd", "--weight_decay", "0.1"])
    assert config.use_AWD_NeurIPS2023


@pytest.mark.parametrize("text,needle", [
    ("--lrr 1", "--lrr (did you mean --lr"),
    ("--wd 1", "did you mean --wd_scheduler"),
    ("--batch_size x", "--batch_size"),
    ("--dtype fp16", "'amp_bf16'"),
    ("--use_modulewise_wd --use_AWD_NeurIPS2023", "two different weight-decay methods"),
    ("--wd_scheduler uniform --use_modulewise_wd", "contradicts --use_modulewise_wd"),
    ("--wd_scheduler alphadecay --use_modulewise_wd false", "needs --use_modulewise_wd true"),
    ("--wd_scheduler awd --weight_decay 0", "give --weight_decay > 0"),
    ("--warmup_steps 10 --num_training_steps 5", "--warmup_steps 10"),
    ("--remove_first_layer maybe", "expected true or false"),
    ("--wd_exclude (", "not a valid regular expression"),
    ("--max_train_tokens lots", "--max_train_tokens"),
    ("--lr 0", "--lr must be positive"),
])
def test_bad_command_lines_name_the_flag(text, needle):
    with pytest.raises(UserError) as err:
        parse_args(shlex.split(text))
    assert needle in str(err.value)


def test_token_budget_gives_steps():
    assert parse_token_count("100M") == 100_000_000 and parse_token_count("1B") == 10**9
    config, _ = parse_args(["--max_train_tokens", "1M", "--total_batch_size", "64", "--max_length", "256",
                            "--warmup_steps", "10"])
    assert config.train_steps() == 1_000_000 // (64 * 256)


def test_every_field_is_a_flag_and_the_table_lists_it():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    table = TrainConfig().table()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in flags
        assert name in table


@pytest.mark.parametrize("module,needle", [("torchrun_main", "(update + 1) % this == 0"),
                                           ("vit_main", "--min_lr_absolute")])
def test_help_prints_every_flag(module, needle, capsys):
    """--help formats every help text (argparse %-formats them: a literal % must not break it)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    assert needle in " ".join(capsys.readouterr().out.split())


def test_dist_timeout_reaches_dist_setup_from_both_entry_points(monkeypatch, tmp_path):
    """--dist_timeout (minutes) reaches dist.setup, whose timeout init_process_group gets (tests/test_dist.py), from
    torchrun_main.py and vit_main.py alike; bad values are refused before anything."""
    from alphadecay import dist
    from tests.conftest import DIGITS, run_main, run_vit, train_args

    assert parse_args([])[0].dist_timeout == 10.0
    calls = []

    def stop(device, timeout_minutes):
        calls.append(timeout_minutes)
        raise UserError("stopped after setup")

    monkeypatch.setattr(dist, "setup", stop)
    assert run_main(train_args(tmp_path, dist_timeout=3)) == 2
    assert run_vit(["--data_path", str(DIGITS), "--dist_timeout", "4"]) == 2
    assert calls == [3.0, 4.0]
    for value in ("0", "-1", "inf", "nan"):
        with pytest.raises(UserError, match="--dist_timeout"):
            parse_args(["--dist_timeout", value])
