"""The one typed configuration of a run: every flag of `torchrun_main.py`, parsed, validated and printable.

Flag names are the official AlphaDecay/GaLore ones wherever those exist (official-code.md §1.1), so the
paper's command lines run unchanged. Differences from the official parser, all deliberate:
- booleans accept both the bare form (`--use_modulewise_wd`) and an explicit value (`--remove_first_layer
  false`); the official `type=bool` flags could never be switched from the command line (bug #1);
- `--alpha_positively_with_WD` exists (the official LLaMA parser never declared it, bug #2);
- unknown or abbreviated flags are an error that suggests the closest valid flag;
- `--dtype auto` picks bfloat16 on a GPU of compute capability 8.0 or newer and float32 otherwise, at run time, not
  at import (bug #29; the official `torch.cuda.is_bf16_supported()` also says yes on V100/T4, which emulate bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from alphadecay.errors import UserError
from alphadecay.wd import registry
from alphadecay.wd.registry import ADAMC_GROUPS, ASSIGN_FUNCS, ESTIMATORS, FITS, METRICS

# the weight-decay methods' registry (alphadecay/wd/registry.py): its methods, then the combinations MULTIPLIERS+FORM
WD_SCHEDULERS = tuple(registry.names())
# the weight-decay options' choices come from the library's registry (alphadecay/wd/registry.py)
ESD_METRICS, PL_FITTINGS, ESD_ESTIMATORS = METRICS, FITS, ESTIMATORS
SCALING_RULES = ("none", "fan2025", "mup_lr")  # alphadecay/scaling.py
SCALING_HEADS = ("matrix", "vector")
OPTIMIZER_IMPLS = ("official", "foreach", "fused", "forloop")  # alphadecay/optim.py
PARALLELISMS = ("ddp", "fsdp")  # alphadecay/parallel.py
REDUCE_DTYPES = ("param", "float32")
NONFINITE = ("stop", "skip")  # alphadecay/update.py
# What a run records besides its flags because it changes the numbers (config.json "provenance", the metrics'
# provenance events, wandb's config); scripts/make_tables.py refuses to average runs that differ in one of these.
PROVENANCE_KEYS = ("world_size", "micro_batch", "gradient_accumulation", "dtype_resolved", "optimizer_impl_resolved",
                   "official_eval_rows", "eval_rows", "eval_tokens", "torch", "transformers")


WD_SCHEDULER_HELP = ("weight-decay method (README, 'Weight decay'); sets that method's defaults. Omitted: derived from "
                     "the official flags below (none of them = uniform). adamc, independent, cautious and swd (and "
                     "the combinations such as alphadecay+cautious) need --optimizer adamw")
WD_TIMESCALE_HELP = ("set the base decay by the AdamW timescale rule (Wang & Aitchison 2024): the decay's timescale "
                     "1/(lr x decay) is this fraction of the run's updates T, i.e. decay = 1/(--lr x this x T) "
                     "(independent: 1/(this x T)); instead of --weight_decay")
ADAMC_GROUPS_HELP = ("the groups adamc corrects: matrices = those holding a parameter with two or more dimensions "
                     "larger than 1 (the others keep AdamW's decay); all")


def _f(default: Any, help: str, choices: tuple | None = None, group: str = "training", **extra: Any) -> Any:
    """A config field: its default, its help text, optional choices and the help section it is listed in."""
    meta = {"help": help, "choices": choices, "group": group, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class FlagConfig:
    """What every run configuration (TrainConfig; the ViT's alphadecay.vit.config.ViTConfig) has besides its fields.

    A subclass is a dataclass whose fields are its command-line flags (declared with `_f`) and sets PROG and
    DESCRIPTION for its `--help`; `build_parser` and `parse_flags` turn it into a parser."""

    PROG: typing.ClassVar[str] = ""
    DESCRIPTION: typing.ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]):
        """The configuration a run's config.json holds: its known fields (the provenance, and keys of other
        versions, are left out; fields it lacks take their defaults). Not validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def table(self) -> str:
        """The configuration as an aligned two-column table, one flag per line."""
        items = self.to_dict()
        width = max(len(k) for k in items)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in items.items())

    def wd_method(self) -> str:
        """The weight-decay method this configuration selects: --wd_scheduler, else the official flags (AWD,
        module-wise with gradnorm + layerwise_sigmoid = AdaDecay, other module-wise = AlphaDecay, none = uniform)."""
        if self.wd_scheduler is not None:
            return self.wd_scheduler
        if self.use_AWD_NeurIPS2023:
            return "awd"
        if self.use_modulewise_wd:
            adadecay = self.esd_metric_for_tb == "gradnorm" and self.assign_func == "layerwise_sigmoid"
            return "adadecay" if adadecay else "alphadecay"
        return "uniform"


@dataclass
class TrainConfig(FlagConfig):
    """Every setting of a training run. Field names are the command-line flags."""

    PROG = "torchrun_main.py"  # (class attributes without annotations: not fields, not flags)
    DESCRIPTION = ("Pretrain LLaMA on C4 with a swappable weight-decay scheduler (Uniform, AWD, "
                   "AdaDecay, AlphaDecay).")

    # --- model and data -------------------------------------------------------------------------------
    model_config: str = _f("configs/llama_60m.json", "LLaMA config JSON (configs/llama_{1m,3m,60m,130m,350m,1b}.json)", group="model and data")
    dataset: str = _f("allenai/c4", "hub dataset in C4 layout (allenai/c4), a local directory in C4 layout (data/c4_sample), or a directory of rows made by `python -m alphadecay.pretokenize` (one global order; resumes on any number of processes)", group="model and data")
    dataset_config: str = _f("en", "C4 variant: the sub-directory holding the shards (en, en.noblocklist, realnewslike, ...)", group="model and data")
    tokenizer: str = _f("t5-base", "hub tokenizer name or local tokenizer directory, e.g. data/tokenizer; with a pretokenized --dataset DIR the default is DIR/tokenizer, the copy saved with the rows", group="model and data")
    max_length: int = _f(256, "tokens per row", group="model and data")
    packing: bool = _f(False, "concatenate documents separated by eos into full rows (no padding) instead of the paper's one right-padded document per row", group="model and data")
    data_seed: int = _f(42, "seed of the shard order and the shuffle buffer (the official code hard-codes 42)", group="model and data")
    shuffle_buffer: int = _f(1000, "documents in the streaming shuffle buffer (datasets' default, as the official run)", group="model and data")
    workers: int = _f(8, "accepted for compatibility; data is read and tokenised in one background thread per rank", group="model and data")
    use_hf_model: bool = _f(False, "accepted for compatibility: the model is always transformers' LlamaForCausalLM", group="model and data")
    hub_retry_seconds: float = _f(600.0, "streamed data from the hub: after huggingface_hub's own retries fail, keep re-opening the shard where it broke (backoff 1 s doubling to 60 s, logged) for this many seconds without a document, then save a checkpoint and stop with exit code 75; 0 = stop at the first failure", group="model and data")

    # --- optimisation ---------------------------------------------------------------------------------
    optimizer: str = _f("adam", "adam = torch Adam (coupled L2 decay, the paper's Adam table); adamw = decoupled decay", choices=("adam", "adamw"))
    optimizer_impl: str = _f("official", "torch's optimizer kernel: official = what the authors' code gets (on CUDA Adam foreach, whose bf16 rounding of grad + wd*p loses most of a small coupled decay, and AdamW fused; on CPU torch's default for-loop); foreach; fused (fp32 arithmetic, one rounding); forloop", choices=OPTIMIZER_IMPLS)
    lr: float = _f(1e-3, "peak learning rate")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    batch_size: int = _f(32, "micro-batch per rank, in sequences (also the evaluation batch)")
    total_batch_size: int = _f(64, "global batch in sequences; accumulation = total / (batch_size * world size)")
    gradient_accumulation: Optional[int] = _f(None, "micro-batches per update; derived from the batch sizes when omitted")
    num_training_steps: int = _f(20000, "optimizer updates (exactly; the official loop does one more)")
    max_train_tokens: Optional[str] = _f(None, "alternative to --num_training_steps: token budget like 100M or 1B (steps = tokens / (total_batch_size * max_length))")
    warmup_steps: int = _f(2000, "linear warmup updates")
    scheduler: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr (cosine and linear)")
    grad_clipping: float = _f(0.0, "clip the global gradient norm to this value; 0 disables (the paper never clips)")
    nonfinite: str = _f("stop", "what a non-finite loss or gradient norm does: stop = end the run at that update, saving nothing from it (exit code 3); skip = drop the update on every rank (no optimizer or weight-decay step) and go on, stopping after --max_skipped_updates in a row", choices=NONFINITE)
    max_skipped_updates: int = _f(10, "--nonfinite skip: stop after this many dropped updates in a row")
    dtype: str = _f("auto", "bfloat16 = pure bf16 weights and optimizer states (the paper); float32; amp_bf16 = float32 master weights with bf16 autocast; auto = bfloat16 on a GPU of compute capability >= 8.0 (Ampere or newer), else float32", choices=("auto", "bfloat16", "float32", "amp_bf16"))
    activation_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    compile: str = _f("auto", "torch.compile the model with its loss (alphadecay/loss.py): auto = on CUDA, off on CPU; checkpoints, evaluation and the spectral passes use the uncompiled model", choices=("auto", "true", "false"))
    loss_chunk_tokens: int = _f(0, "compute lm_head and the cross-entropy over this many tokens at a time, so the fp32 logits of a whole micro-batch never exist (alphadecay/loss.py); 0 = the whole micro-batch at once")
    seed: int = _f(0, "seed of the model initialisation (the same on every rank)")
    device: str = _f("auto", "auto = this rank's GPU when there is one, else CPU", choices=("auto", "cpu", "cuda"))
    parallelism: str = _f("ddp", "how the processes share the model: ddp = a whole replica on each (weights, gradients and Adam states: 8 bytes per parameter in pure bf16 on every GPU); fsdp = FSDP2 (torch's fully_shard), each decoder layer, the embedding, the final norm with lm_head and the root sharded over the processes, 1/N of those bytes per GPU (alphadecay/parallel.py)", choices=PARALLELISMS)
    reduce_dtype: str = _f("param", "--parallelism fsdp: the dtype gradients are reduce-scattered in: param = the parameters' (bf16 in pure bf16, as DDP's all-reduce); float32 = summed over the ranks in float32, rounded once to the parameter dtype", choices=REDUCE_DTYPES)
    dist_timeout: float = _f(10.0, "minutes a collective may wait for the other processes before the run fails (the process group's timeout): a rank that dies mid-run then ends the others instead of leaving them in a collective; raise it if one rank legitimately works alone longer (torch's own default: 10 for NCCL, 30 for gloo)")
    single_cuda: bool = _f(False, "accepted for compatibility: a one-process run never uses DDP")

    # --- weight decay ---------------------------------------------------------------------------------
    weight_decay: float = _f(1e-5, "base weight decay", group="weight decay")
    decay_norms: bool = _f(True, "decay RMSNorm gains (the paper decays every parameter)", group="weight decay")
    decay_embeddings: bool = _f(True, "decay the token embedding (the paper decays every parameter)", group="weight decay")
    wd_scheduler: Optional[str] = _f(None, WD_SCHEDULER_HELP, choices=WD_SCHEDULERS, group="weight decay")
    wd_timescale: Optional[float] = _f(None, WD_TIMESCALE_HELP, group="weight decay")
    adamc_groups: str = _f("matrices", ADAMC_GROUPS_HELP, choices=ADAMC_GROUPS, group="weight decay")
    use_AWD_NeurIPS2023: bool = _f(False, "AWD (Ghiasi et al. 2023), the paper's baseline1", group="weight decay")
    awd_multiplier: float = _f(100.0, "AWD's lambda_awd = awd_multiplier * --weight_decay (the official LLaMA code uses 100)", group="weight decay")
    use_modulewise_wd: bool = _f(False, "module-wise decay from per-module ESD metrics: AlphaDecay, or AdaDecay with gradnorm + layerwise_sigmoid", group="weight decay")
    alpha_positively_with_WD: bool = _f(False, "apply the metric-to-decay mapping (without it the module-wise pass only measures and logs)", group="weight decay")
    unbalancedWD_every: int = _f(500, "recompute module-wise decays at update 0 and whenever (update + 1) % this == 0", group="weight decay")
    esd_metric_for_tb: str = _f("alpha", "per-module metric that drives the decay", choices=ESD_METRICS, group="weight decay")
    assign_func: str = _f("tb_linear_map", "metric-to-decay map", choices=ASSIGN_FUNCS, group="weight decay")
    wd_min_ratio: float = _f(0.666, "decay multiplier of the module with the smallest metric (tb_linear_map)", group="weight decay")
    wd_max_ratio: float = _f(3.0, "decay multiplier of the module with the largest metric (tb_linear_map)", group="weight decay")
    pl_fitting: str = _f("median", "power-law xmin choice for alpha", choices=PL_FITTINGS, group="weight decay")
    esd_estimator: str = _f("full", "ESD that alpha is fitted on: full = the whole matrix (official); farms = the pooled ESD of fixed-aspect-ratio submatrices (FARMS, Hu et al. 2025), which removes the attention/MLP shape bias of alpha", choices=ESD_ESTIMATORS, group="weight decay")
    farms_window: int = _f(2000, "FARMS: short side of each submatrix, capped to the matrix (the authors' LLaMA runs: 2000)", group="weight decay")
    farms_aspect_ratio: float = _f(1.0, "FARMS: long side / short side of each submatrix, >= 1 (the authors' LLaMA runs: 1, square)", group="weight decay")
    farms_windows_per_dim: int = _f(15, "FARMS: submatrix positions along each dimension (the authors' LLaMA runs: 15)", group="weight decay")
    farms_min_step: float = _f(0.05, "FARMS: neighbouring submatrix positions at least this fraction of the submatrix's side apart, i.e. fewer positions where a matrix is barely larger than the submatrix (llama_1b's 2048-wide sides); 0 = the authors' positions, which at 1B are 3 rows apart", group="weight decay")
    xmin_pos: float = _f(2.0, "median fit: xmin is eigenvalue number int(N / xmin_pos) (2 = the median)", group="weight decay")
    filter_zeros: bool = _f(False, "drop eigenvalues <= 1e-5 before fitting", group="weight decay")
    remove_first_layer: bool = _f(True, "leave the first Linear in module order (layer-0 q_proj) at the base decay, as the official code", group="weight decay")
    remove_last_layer: bool = _f(True, "leave the last Linear (lm_head) at the base decay, as the official code", group="weight decay")
    wd_exclude: list = _f([], "regular expressions; Linear modules whose name matches one are not tuned (repeatable)", group="weight decay", nargs="*")
    official_fix_finger: bool = _f(False, "fix-finger fit with the official code's lower bound (a log10 value compared with linear eigenvalues)", group="weight decay")
    official_adadecay_init: bool = _f(False, "AdaDecay (gradnorm + layerwise_sigmoid): give every tuned module decay 0 until the first in-loop pass, as the official code's integer gradient-norm placeholder does (default: the base decay, the method's intent)", group="weight decay")
    batchnorm: bool = _f(True, "accepted for compatibility (ties BatchNorm decay to convolutions; LLaMA has none)", group="weight decay")
    batchnorm_type: str = _f("name", "accepted for compatibility (no effect on LLaMA)", choices=("name",), group="weight decay")

    # --- scaling rules (alphadecay/scaling.py, alphadecay/diagnostics.py) -------------------------------
    scaling_rule: str = _f("none", "layerwise lr/decay rule across widths d (Fan et al. 2025): none = standard parameterisation; fan2025 = matrices lr x base_width/d and decay x sqrt(d/base_width), vectors (norms, embedding) decay 0; mup_lr = the matrix lr rule only", choices=SCALING_RULES, group="scaling rules")
    base_width: Optional[int] = _f(None, "hidden size of the proxy model on which --lr and --weight_decay were tuned; required by --scaling_rule fan2025 and mup_lr", group="scaling rules")
    scaling_head: str = _f("matrix", "the rule's class for lm_head: matrix (muP's 1/fan_in Adam lr for an output layer without a width multiplier, decay x sqrt(d/base_width)) or vector (lr x 1, decay 0)", choices=SCALING_HEADS, group="scaling rules")
    diagnostics_every: int = _f(0, "log each Linear's top singular value (sigma_max/<module>) and each sublayer's gain on a fixed probe batch (gain/attn/<layer>, gain/mlp/<layer>) every this many updates and at the end; 0 = off", group="scaling rules")

    # --- evaluation, logging, checkpoints -------------------------------------------------------------
    eval_every: int = _f(100, "evaluate every this many updates (and at the end)", group="evaluation, logging, checkpoints")
    target_eval_tokens: int = _f(10_000_000, "validation tokens per evaluation: the first rows of the split in source order whose real tokens reach this (the same rows every time, whatever the number of processes)", group="evaluation, logging, checkpoints")
    official_eval_rows: int = _f(512, "rows per batch of the official estimator eval_loss_official (sum of batch means / (batches + 1)): the official run's world size x per-GPU batch, 512 in every official script", group="evaluation, logging, checkpoints")
    log_every: int = _f(1, "log training metrics every this many updates", group="evaluation, logging, checkpoints")
    peak_tflops: Optional[float] = _f(None, "the device's peak dense bf16 TFLOP/s for the logged mfu (CUDA only); default: looked up from the GPU's name (A100, H100, H200), mfu omitted for other GPUs", group="evaluation, logging, checkpoints")
    save_every: int = _f(10000, "checkpoint every this many updates (and at the end)", group="evaluation, logging, checkpoints")
    keep_checkpoints: Optional[int] = _f(None, "keep the newest N checkpoints: older ones are deleted once a newer one is complete; default all", group="evaluation, logging, checkpoints")
    save_dir: Optional[str] = _f(None, "run directory (checkpoints, metrics.jsonl, wandb); default checkpoints/<config>-<time>-<wandb_name>", group="evaluation, logging, checkpoints")
    continue_from: Optional[str] = _f(None, "resume from a checkpoint directory (model_<step>), which must verify against its manifest, or a run directory (its newest checkpoint that verifies; newer damaged ones are named and skipped)", group="evaluation, logging, checkpoints")
    wandb_name: str = _f("code_test", "wandb run name", group="evaluation, logging, checkpoints")
    wandb_project: str = _f("AlphaDecay", "wandb project", group="evaluation, logging, checkpoints")
    wandb_mode: Optional[str] = _f(None, "wandb mode; default: $WANDB_MODE if set, else offline", choices=("online", "offline", "disabled"), group="evaluation, logging, checkpoints")
    tags: Optional[str] = _f(None, "comma-separated wandb tags", group="evaluation, logging, checkpoints")
    name: str = _f("test", "accepted for compatibility (unused by the official code too)", group="evaluation, logging, checkpoints")

    # ------------------------------------------------------------------------------------------------------
    def train_steps(self) -> int:
        """Number of updates: --num_training_steps, or --max_train_tokens / tokens per update."""
        if self.max_train_tokens is None:
            return self.num_training_steps
        return parse_token_count(self.max_train_tokens) // (self.total_batch_size * self.max_length)


def parse_token_count(text: str) -> int:
    """'100M' -> 100_000_000, '1B' -> 1_000_000_000, '2_000' -> 2000."""
    match = re.fullmatch(r"\s*([0-9_.]+)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise UserError(f"--max_train_tokens {text!r} is not a token count; use an integer or a number with K, M or B.")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()]
    return int(float(match.group(1).replace("_", "")) * scale)


def _str2bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(inner: type) -> Any:
    def convert(text: str) -> Any:
        return None if str(text).lower() in ("none", "null", "") else inner(text)

    convert.__name__ = inner.__name__
    return convert


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as a UserError with a suggestion, instead of exiting."""

    def error(self, message: str) -> typing.NoReturn:
        unknown = re.search(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [a for a in unknown.group(1).split() if a.startswith("--")]
            hints = []
            for flag in flags or unknown.group(1).split()[:1]:
                names = self._flag_names()
                close = [n for n in names if n.startswith(flag)][:3] or difflib.get_close_matches(flag, names, n=1)
                hints.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else flag)
            message = f"unknown flag(s): {', '.join(hints)}. Run `python {self.prog} --help` for the valid flags."
        raise UserError(f"command line: {message}")

    def _flag_names(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]


def build_parser(config_cls: type[FlagConfig] = TrainConfig) -> argparse.ArgumentParser:
    """The command line of a configuration dataclass: one flag per field, in its help sections.

    Booleans take a bare flag (true) or an explicit value; lists take several values (`nargs` and `item_type` in
    the field's metadata); Optional fields take `none`. No abbreviations; unknown flags are a UserError."""
    parser = _Parser(
        prog=config_cls.PROG,
        description=config_cls.DESCRIPTION,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(config_cls):
        section = sections.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        section.add_argument(f"--{f.name}", default=argparse.SUPPRESS,
                             **_flag_kwargs(f, hints[f.name], f"default: {_field_default(f)}"))
    return parser


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _flag_kwargs(f: dataclasses.Field, kind: Any, default_text: str) -> dict[str, Any]:
    """argparse's type, nargs, choices and help for one config field (its default is the caller's)."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"help": f"{meta['help']} ({default_text})".replace("%", "%%")}  # argparse %-formats help
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    optional = typing.get_origin(kind) is typing.Union  # Optional[X]
    inner = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
    if inner is bool:
        kwargs.update(nargs="?", const=True, type=_str2bool, metavar="{true,false}")
    elif inner is list:
        kwargs.update(nargs=meta.get("nargs", "*"), type=meta.get("item_type", str))
    elif optional:
        kwargs["type"] = _optional(inner)
    else:
        kwargs["type"] = kind
    return kwargs


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...], *, from_run: bool = False,
                     config_cls: type[FlagConfig] = TrainConfig) -> None:
    """Flags of another command line that mean what these config fields mean: the training flag's type, choices
    and help. Their default is the field's, or with from_run None (the command takes the value from the run it
    reads, else the field's default; the help says so)."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in names:
        default = _field_default(fields[name])
        text = f"default: the run's value, else {default}" if from_run else f"default: {default}"
        parser.add_argument(f"--{name}", default=None if from_run else default,
                            **_flag_kwargs(fields[name], hints[name], text))


def parse_flags(config_cls: type[FlagConfig], argv: list[str] | None = None) -> tuple[Any, set[str]]:
    """The command line as an unvalidated `config_cls`, and the names of the flags given (a flag given twice: the
    last value, as argparse)."""
    namespace = build_parser(config_cls).parse_args(sys.argv[1:] if argv is None else argv)
    given = dict(vars(namespace))
    return config_cls(**given), set(given)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Parse the command line into a validated TrainConfig; also return the names of the flags given."""
    config, given = parse_flags(TrainConfig, argv)
    apply_method_defaults(config, given)
    apply_data_defaults(config, given)
    check_wd_timescale(config, given)
    validate(config)
    resolve_wd_timescale(config, config.train_steps())
    return config, given


PRETOKENIZED_META = "pretokenized.json"  # the metadata file of a directory made by python -m alphadecay.pretokenize


def apply_data_defaults(config: TrainConfig, given: set[str]) -> None:
    """A pretokenized --dataset DIR brings its tokenizer: without --tokenizer, use DIR/tokenizer (the copy the
    pretokenizer saved), so that training from it needs no hub and cannot pick a mismatching vocabulary."""
    saved = os.path.join(config.dataset, "tokenizer")
    if ("tokenizer" not in given and os.path.isfile(os.path.join(config.dataset, PRETOKENIZED_META))
            and os.path.isdir(saved)):
        config.tokenizer = saved


def apply_method_defaults(config: FlagConfig, given: set[str]) -> None:
    """Fill in --wd_scheduler's defaults (its registry entry's official flags) and reject combinations that name two
    methods at once."""
    name = config.wd_scheduler
    if config.use_AWD_NeurIPS2023 and config.use_modulewise_wd:
        raise UserError("--use_AWD_NeurIPS2023 and --use_modulewise_wd select two different weight-decay methods; "
                        f"give one of them (or --wd_scheduler {{{','.join(WD_SCHEDULERS)}}}).")
    if name is None:
        return
    flags = registry.method(name).flags
    if config.use_AWD_NeurIPS2023 and not flags.get("use_AWD_NeurIPS2023"):
        raise UserError(f"--wd_scheduler {name} contradicts --use_AWD_NeurIPS2023 (that is --wd_scheduler awd).")
    if config.use_modulewise_wd and not flags.get("use_modulewise_wd"):
        raise UserError(f"--wd_scheduler {name} contradicts --use_modulewise_wd "
                        "(module-wise decay is --wd_scheduler alphadecay or adadecay).")
    if not flags and config.alpha_positively_with_WD:
        raise UserError(f"--wd_scheduler {name} contradicts --alpha_positively_with_WD (a module-wise mapping switch).")
    for key, value in flags.items():
        if key in given and isinstance(value, bool) and getattr(config, key) != value:
            raise UserError(f"--wd_scheduler {name} needs --{key} true, but the command line gives "
                            f"--{key} false; drop one of the two.")
        if key not in given:  # the metric and the map stay overridable, for the paper's ablations
            setattr(config, key, value)


def validate(config: TrainConfig) -> None:
    """Checks that need no files, processes or devices (those come later, still before any compute)."""
    positive = ("lr", "batch_size", "total_batch_size", "max_length", "eval_every", "save_every", "log_every",
                "max_skipped_updates", "unbalancedWD_every", "shuffle_buffer", "target_eval_tokens", "official_eval_rows")
    for name in positive:
        if getattr(config, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(config, name)}.")
    if config.train_steps() <= 0:
        raise UserError(f"the run has {config.train_steps()} updates; --num_training_steps (or --max_train_tokens) must give at least 1.")
    if config.warmup_steps < 0 or config.warmup_steps > config.train_steps():
        raise UserError(f"--warmup_steps {config.warmup_steps} must be between 0 and the number of updates ({config.train_steps()}).")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise UserError(f"--min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}.")
    if config.weight_decay < 0 or config.grad_clipping < 0:
        raise UserError("--weight_decay and --grad_clipping must be >= 0.")
    if config.loss_chunk_tokens < 0:
        raise UserError(f"--loss_chunk_tokens must be >= 0 (0 = the whole micro-batch at once), got {config.loss_chunk_tokens}.")
    if config.peak_tflops is not None and not (math.isfinite(config.peak_tflops) and config.peak_tflops > 0):
        raise UserError(f"--peak_tflops must be a positive number of TFLOP/s (e.g. 989 for an H100), got {config.peak_tflops}.")
    if config.keep_checkpoints is not None and config.keep_checkpoints <= 0:
        raise UserError(f"--keep_checkpoints must be at least 1 (omit it to keep every checkpoint), got {config.keep_checkpoints}.")
    if not (math.isfinite(config.hub_retry_seconds) and config.hub_retry_seconds >= 0):
        raise UserError(f"--hub_retry_seconds must be a number of seconds >= 0, got {config.hub_retry_seconds}.")
    check_dist_timeout(config.dist_timeout)
    if config.gradient_accumulation is not None and config.gradient_accumulation <= 0:
        raise UserError(f"--gradient_accumulation must be positive, got {config.gradient_accumulation}.")
    validate_weight_decay(config)
    validate_scaling(config)
    validate_parallelism(config)
    if config.official_adadecay_init and not official_adadecay_init_applies(config):
        raise UserError("--official_adadecay_init only changes AdaDecay (--use_modulewise_wd --alpha_positively_with_WD "
                        "--esd_metric_for_tb gradnorm --assign_func layerwise_sigmoid, or --wd_scheduler adadecay); "
                        "this run selects another method, so drop the flag.")
    for name in ("lr", "min_lr_ratio"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name} must be a finite number.")


def validate_weight_decay(config: FlagConfig) -> None:
    """The weight-decay flags every model family shares (TrainConfig, ViTConfig)."""
    for name in ("weight_decay", "wd_min_ratio", "wd_max_ratio"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name} must be a finite number.")
    if config.wd_min_ratio < 0 or config.wd_max_ratio < 0:
        raise UserError("--wd_min_ratio and --wd_max_ratio must be >= 0.")
    if config.xmin_pos <= 1:
        raise UserError(f"--xmin_pos must be > 1 (2 = median xmin), got {config.xmin_pos}.")
    check_farms(config.farms_window, config.farms_aspect_ratio, config.farms_windows_per_dim, config.farms_min_step)
    method = config.wd_method()
    if "awd" in registry.parts(method) and config.weight_decay <= 0:
        raise UserError("AWD sets lambda_awd = --awd_multiplier * --weight_decay; give --weight_decay > 0.")
    if registry.uses_form(method) and config.optimizer != "adamw":
        raise UserError(f"--wd_scheduler {method} is defined for decoupled weight decay (AdamW: p <- p - lr x wd x "
                        f"p); --optimizer {config.optimizer} applies torch Adam's coupled L2 decay (wd x p added to "
                        "the gradient, the paper's Adam table). Add --optimizer adamw, or choose uniform, awd, "
                        "adadecay or alphadecay.")
    for pattern in config.wd_exclude:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"--wd_exclude {pattern!r} is not a valid regular expression: {err}.") from None


def check_dist_timeout(minutes: float) -> None:
    """--dist_timeout (TrainConfig, ViTConfig)."""
    if not 0 < minutes < math.inf:
        raise UserError(f"--dist_timeout must be a positive number of minutes (default 10), got {minutes}.")


def check_wd_timescale(config: FlagConfig, given: set[str]) -> None:
    """--wd_timescale replaces --weight_decay: not both, a positive fraction, AdamW, a method whose decay has a
    timescale known before training."""
    if config.wd_timescale is None:
        return
    if "weight_decay" in given:
        raise UserError(f"--wd_timescale {config.wd_timescale} sets the base decay (1/(lr x timescale x updates)) and "
                        f"--weight_decay {config.weight_decay} sets it too; give one of them.")
    if not (math.isfinite(config.wd_timescale) and config.wd_timescale > 0):
        raise UserError(f"--wd_timescale is a positive fraction of the run (e.g. 0.2), got {config.wd_timescale}.")
    if config.optimizer != "adamw":
        raise UserError("--wd_timescale is the timescale rule of AdamW's decoupled decay; with --optimizer "
                        f"{config.optimizer} (coupled L2) the decay has no such timescale. Add --optimizer adamw, or "
                        "give --weight_decay.")
    try:
        registry.timescale_weight_decay(config.wd_method(), timescale=config.wd_timescale, peak_lr=1.0, updates=1)
    except registry.WeightDecayError as err:
        raise UserError(f"--wd_timescale: {err}") from None


def resolve_wd_timescale(config: FlagConfig, updates: int) -> str | None:
    """With --wd_timescale, set config.weight_decay by the timescale rule for a run of `updates` updates and return
    the line that says so (printed at start; config.json records both flags); else None."""
    if config.wd_timescale is None:
        return None
    config.weight_decay = registry.timescale_weight_decay(config.wd_method(), timescale=config.wd_timescale,
                                                          peak_lr=config.lr, updates=updates)
    independent = registry.method(config.wd_method()).decay_unit == "lr_max"
    unit = "1/(timescale x T)" if independent else "1/(lr x timescale x T)"
    return (f"weight decay {config.weight_decay:.6g} = {unit} from --wd_timescale {config.wd_timescale:g}, --lr "
            f"{config.lr:g}, T = {updates} updates (the timescale rule, Wang & Aitchison 2024)")


def check_farms(window: int, aspect_ratio: float, windows_per_dim: int, min_step: float) -> None:
    """The FARMS sampling flags (training and `python -m alphadecay.esd`)."""
    if window < 1 or windows_per_dim < 1 or not aspect_ratio >= 1:
        raise UserError(f"--farms_window and --farms_windows_per_dim must be >= 1 and --farms_aspect_ratio >= 1 "
                        f"(1 = square submatrices); got {window}, {windows_per_dim}, {aspect_ratio}.")
    if not 0 <= min_step < math.inf:
        raise UserError(f"--farms_min_step must be a finite fraction >= 0 (0 = the FARMS authors' window positions, "
                        f"0.05 = the default); got {min_step}.")


def official_adadecay_init_applies(config: TrainConfig) -> bool:
    """The official integer placeholder zeroes the decays only through layerwise_sigmoid's np.zeros_like of the
    gradient-norm scores (WeightDecayUnbalance.py:234, :344, :358), and only when the mapping is applied."""
    return (config.use_modulewise_wd and config.alpha_positively_with_WD and config.assign_func == "layerwise_sigmoid"
            and config.esd_metric_for_tb in ("gradnorm", "gradnorm_d_weightnorm"))


def validate_parallelism(config: TrainConfig) -> None:
    """What --parallelism fsdp does not combine with."""
    if config.parallelism == "ddp" and config.reduce_dtype != "param":
        raise UserError(f"--reduce_dtype {config.reduce_dtype} applies to --parallelism fsdp; DDP all-reduces gradients "
                        "in the parameters' dtype. Add --parallelism fsdp or drop --reduce_dtype.")
    if config.parallelism == "fsdp" and config.diagnostics_every:
        raise UserError("--diagnostics_every is not available with --parallelism fsdp (its top singular values read "
                        "whole weights); use --parallelism ddp for the scaling-rule diagnostics, or drop the flag.")
    unsharded = [p for p in registry.parts(config.wd_method()) if p in ("cautious", "swd")]
    if config.parallelism == "fsdp" and unsharded:
        raise UserError(f"--wd_scheduler {config.wd_method()} with --parallelism fsdp: {unsharded[0]} reads Adam's "
                        "moments over every parameter entry, which is verified on whole tensors only, not yet on "
                        "FSDP's shards. Use --parallelism ddp, or adamc / independent (and their alphadecay+ "
                        "combinations), which work on shards.")


def validate_scaling(config: TrainConfig) -> None:
    """The scaling-rule flags: a rule needs the proxy width, and fan2025's decay rule is for decoupled decay."""
    rule = config.scaling_rule
    if rule != "none" and config.base_width is None:
        raise UserError(f"--scaling_rule {rule} needs --base_width: the hidden size of the proxy model on which --lr "
                        "and --weight_decay were tuned (the proxy run itself passes its own hidden size).")
    if rule == "none" and config.base_width is not None:
        raise UserError("--base_width has no effect with --scaling_rule none; add --scaling_rule fan2025 (or mup_lr) "
                        "or drop --base_width.")
    if config.base_width is not None and config.base_width <= 0:
        raise UserError(f"--base_width must be positive, got {config.base_width}.")
    if rule == "fan2025" and config.optimizer != "adamw":
        raise UserError("--scaling_rule fan2025 scales decoupled (AdamW) weight decay; torch Adam's decay is coupled "
                        "L2, for which the rule is not derived. Add --optimizer adamw.")
    if config.diagnostics_every < 0:
        raise UserError(f"--diagnostics_every must be >= 0 (0 = off), got {config.diagnostics_every}.")


def save(config: FlagConfig, path: str, provenance: dict[str, Any] | None = None) -> None:
    """The flags as JSON; with `provenance`, also what the run resolved them to, under the key "provenance"."""
    record = config.to_dict()
    if provenance is not None:
        record["provenance"] = provenance
    with open(path, "w") as fh:
        json.dump(record, fh, indent=2, sort_keys=False)
        fh.write("\n")
