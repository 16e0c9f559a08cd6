"""The typed configuration of a ViT run: every flag of the official ViT `main.py` (shared notes, vit.md), parsed by
the same machinery as the LLaMA side's TrainConfig (`config.build_parser`), validated and printable.

Flag names and defaults are the official ones, so the paper's 9 ViT command lines run unchanged. Deliberate
differences, each also in the README's "Differences from the official code":
- booleans accept the bare form (`--use_modulewise_wd`) and an explicit value (`--model_ema true`): the official
  `type=bool` flags made the published AlphaDecay/AdaDecay scripts fail to parse;
- `--use_modulewise_wd` and `--alpha_positively_with_WD` default to False (officially True, so the "Uniform"
  scripts silently ran AlphaDecay); `--wd_scheduler` selects a method by name, as on the LLaMA side;
- `--min_lr` is read as a ratio of `--lr`, as the official code does (the cosine ends at 1e-6 x 4e-3 = 4e-9);
  `--min_lr_absolute` makes it the absolute floor its help text describes;
- `--nb_classes` defaults to the number of class folders (officially `--data_set IMNET` builds 1000 outputs
  whatever it finds: the same on ImageNet; `--nb_classes 1000` reproduces it elsewhere);
- `--device auto` (officially `cuda`, and NCCL hard-coded);
- flags the official code declares but never reads (or reads only for models other than the ViT) are accepted
  and say so in their help; a few official switches we do not implement are rejected with a UserError when set
  to anything but their default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from alphadecay.config import (ADAMC_GROUPS, ADAMC_GROUPS_HELP, ASSIGN_FUNCS, ESD_ESTIMATORS, ESD_METRICS, NONFINITE,
                               OPTIMIZER_IMPLS, PL_FITTINGS, WD_SCHEDULER_HELP, WD_SCHEDULERS, WD_TIMESCALE_HELP,
                               FlagConfig, _f, apply_method_defaults, check_dist_timeout, check_wd_timescale,
                               parse_flags, validate_weight_decay)
from alphadecay.errors import UserError
from alphadecay.vit.mixup import MODES
from alphadecay.vit.model import ARCHS, resolve_model_name

COMPAT = "accepted for compatibility with the official command line; "
UNREAD = COMPAT + "the official ViT code declares it but never reads it"
M, D, A, T, W, L = "model", "data", "augmentation", "training", "weight decay", "evaluation, logging, checkpoints"


@dataclass
class ViTConfig(FlagConfig):
    """Every setting of a ViT run. Field names are the command-line flags (the official main.py's, plus ours)."""

    PROG = "vit_main.py"
    DESCRIPTION = ("Train a ViT (DeiT-tiny) on an ImageFolder dataset with a swappable weight-decay scheduler "
                   "(Uniform, AWD, AdaDecay, AlphaDecay).")

    # --- model ------------------------------------------------------------------------------------------
    model: str = _f("vit_deit_tiny_patch16_224", f"the ViT to train: {', '.join(ARCHS)} (alias deit_tiny_patch16_224)", group=M)
    input_size: int = _f(224, "image side in pixels (a multiple of the model's patch size; <= 32 uses the official CIFAR-style crops)", group=M)
    drop_path: float = _f(0.0, "stochastic depth rate of the last block (rising linearly from 0 at the first)", group=M)
    nb_classes: Optional[int] = _f(None, "outputs of the head; default: the number of class folders (the official --data_set IMNET builds 1000 whatever it finds; give 1000 to reproduce that on other data)", group=M)
    layer_scale_init_value: float = _f(1e-6, COMPAT + "ConvNeXt's layer scale; the ViT has none", group=M)
    head_init_scale: float = _f(1.0, UNREAD, group=M)
    finetune: str = _f("", "not implemented: must stay empty (official: start from a checkpoint)", group=M)
    model_key: str = _f("model|module", COMPAT + "only read with --finetune", group=M)
    model_prefix: str = _f("", COMPAT + "only read with --finetune", group=M)

    # --- data -------------------------------------------------------------------------------------------
    data_path: Optional[str] = _f(None, "dataset directory with train/<class>/<image> and val/<class>/<image> (ImageNet's layout); required", group=D)
    data_set: str = _f("IMNET", "dataset kind: IMNET = data_path/train and data_path/val (the only one implemented)", choices=("IMNET",), group=D)
    eval_data_path: Optional[str] = _f(None, COMPAT + "only read for --data_set image_folder", group=D)
    imagenet_default_mean_and_std: bool = _f(True, "normalise with ImageNet's mean and std (false: 0.5 for both, timm's Inception constants)", group=D)
    crop_pct: Optional[float] = _f(None, "evaluation: center crop of input_size from a resize to input_size / crop_pct (default 224/256)", group=D)
    num_workers: int = _f(8, "processes decoding and augmenting images per rank (0 = in the training process); any value gives the same batches", group=D)
    pin_mem: bool = _f(False, "pin the batches' host memory (faster copies to a GPU)", group=D)
    check_images: bool = _f(True, "open every image's header before training (the ranks share the work), so an unreadable file is named before any compute", group=D)

    # --- augmentation -----------------------------------------------------------------------------------
    aa: str = _f("rand-m9-mstd0.5-inc1", "RandAugment policy (rand-m<magnitude>-n<ops>-mstd<std>-inc<0|1>); none = off", group=A)
    color_jitter: float = _f(0.4, "colour jitter strength, used only with --aa none (as timm)", group=A)
    train_interpolation: str = _f("bicubic", "training resize interpolation: bicubic, bilinear, lanczos, hamming, random", group=A)
    smoothing: float = _f(0.1, "label smoothing (inside the Mixup/CutMix soft targets, or label-smoothing cross-entropy without them)", group=A)
    reprob: float = _f(0.25, "random erasing probability (0 = off)", group=A)
    remode: str = _f("pixel", "random erasing fill: pixel, rand, const", choices=("pixel", "rand", "const"), group=A)
    recount: int = _f(1, "random erasing boxes per image", group=A)
    resplit: bool = _f(False, UNREAD, group=A)
    mixup: float = _f(0.8, "Mixup alpha (0 = off)", group=A)
    cutmix: float = _f(1.0, "CutMix alpha (0 = off)", group=A)
    cutmix_minmax: Optional[list] = _f(None, "CutMix box side range as two ratios (overrides --cutmix)", group=A, nargs="+", item_type=float)
    mixup_prob: float = _f(1.0, "probability of mixing a batch at all", group=A)
    mixup_switch_prob: float = _f(0.5, "probability of CutMix rather than Mixup when both are on", group=A)
    mixup_mode: str = _f("batch", "one draw per batch, pair or element", choices=MODES, group=A)

    # --- training ---------------------------------------------------------------------------------------
    batch_size: int = _f(64, "micro-batch per process (the official scripts: 192 on each of 2 GPUs)", group=T)
    epochs: int = _f(120, "passes over the training images", group=T)
    update_freq: int = _f(1, "micro-batches per optimizer update (gradient accumulation); the loss is the mean over all of them on all processes", group=T)
    optimizer: str = _f("adam", "adam = torch Adam, coupled L2 decay (the official ViT code's only optimizer); adamw = decoupled", choices=("adam", "adamw"), group=T)
    optimizer_impl: str = _f("official", "torch's optimizer kernel: official = the authors' (torch's default: foreach on CUDA, for-loop on CPU); foreach; fused; forloop", choices=OPTIMIZER_IMPLS, group=T)
    lr: float = _f(4e-3, "peak learning rate", group=T)
    min_lr: float = _f(1e-6, "end of the cosine: as a RATIO of --lr, as the official code reads it (final lr = lr * min_lr), unless --min_lr_absolute", group=T)
    min_lr_absolute: bool = _f(False, "read --min_lr as the absolute final learning rate its official help describes (default: the official code's ratio)", group=T)
    warmup_epochs: int = _f(20, "linear warmup from 0, per update, over this many epochs", group=T)
    warmup_steps: int = _f(-1, "if > 0, warmup updates instead of --warmup_epochs (the official code declares it but never reads it)", group=T)
    opt_eps: float = _f(1e-8, "Adam epsilon (the official code declares it but never reads it; torch's default is the same)", group=T)
    opt_betas: Optional[list] = _f(None, "Adam betas, two values; default torch's (0.9, 0.999) (the official code declares it but never reads it)", group=T, nargs="+", item_type=float)
    clip_grad: Optional[float] = _f(None, "clip the global gradient norm to this value; default none (the official code declares it but never clips)", group=T)
    nonfinite: str = _f("stop", "what a non-finite loss or gradient norm does: stop = end the run at that update, saving nothing from it (exit code 3); skip = drop the update on every rank (no optimizer, weight-decay or EMA step) and go on, stopping after --max_skipped_updates in a row", choices=NONFINITE, group=T)
    max_skipped_updates: int = _f(10, "--nonfinite skip: stop after this many dropped updates in a row", group=T)
    momentum: float = _f(0.9, COMPAT + "SGD momentum; no SGD here", group=T)
    weight_decay_end: Optional[float] = _f(None, UNREAD + " (its cosine decay schedule is computed and unused)", group=T)
    layer_decay: float = _f(1.0, "layer-wise lr decay: only 1.0 (official: ConvNeXt only)", group=T)
    seed: int = _f(0, "seed of the initialisation, the data order and the augmentation (process r's drop path draws from seed + r)", group=T)
    device: str = _f("auto", "auto = this process's GPU when there is one, else CPU", choices=("auto", "cpu", "cuda"), group=T)
    dist_timeout: float = _f(10.0, "minutes a collective may wait for the other processes before the run fails (the process group's timeout): a rank that dies mid-run then ends the others instead of leaving them in a collective; raise it if one rank legitimately works alone longer (torch's own default: 10 for NCCL, 30 for gloo)", group=T)
    dtype: str = _f("float32", "float32 (the official ViT runs); amp_bf16 = float32 weights with bf16 autocast", choices=("float32", "amp_bf16"), group=T)
    use_amp: bool = _f(False, "mixed precision: the same as --dtype amp_bf16 (the official --use_amp true crashes)", group=T)
    model_ema: bool = _f(False, "keep an exponential moving average of the weights, updated after every optimizer update", group=T)
    model_ema_decay: float = _f(0.9999, "EMA decay per update (constant, no warm-up)", group=T)
    model_ema_force_cpu: bool = _f(False, COMPAT + "the EMA stays on the training device", group=T)
    model_ema_eval: bool = _f(False, "evaluate the EMA too, every epoch (ema_top1, ema_top5, ema_eval_loss)", group=T)
    test_code: bool = _f(False, COMPAT + "no effect (official: stop every epoch after 3 updates)", group=T)

    # --- weight decay -----------------------------------------------------------------------------------
    weight_decay: float = _f(5e-6, "base weight decay", group=W)
    decay_norms: bool = _f(True, "decay LayerNorm weights and biases (the paper decays every parameter)", group=W)
    decay_embeddings: bool = _f(True, "decay cls_token and pos_embed (the paper decays every parameter)", group=W)
    wd_scheduler: Optional[str] = _f(None, WD_SCHEDULER_HELP, choices=WD_SCHEDULERS, group=W)
    wd_timescale: Optional[float] = _f(None, WD_TIMESCALE_HELP + " (T: --epochs x the updates of an epoch)", group=W)
    adamc_groups: str = _f("matrices", ADAMC_GROUPS_HELP, choices=ADAMC_GROUPS, group=W)
    use_AWD_NeurIPS2023: bool = _f(False, "AWD (Ghiasi et al. 2023), the paper's baseline1", group=W)
    awd_multiplier: float = _f(50.0, "AWD's lambda_awd = awd_multiplier * --weight_decay (the official ViT code uses 50)", group=W)
    use_modulewise_wd: bool = _f(False, "module-wise decay from per-module metrics: AlphaDecay, or AdaDecay with gradnorm + layerwise_sigmoid (official default True, which made the Uniform scripts run AlphaDecay)", group=W)
    alpha_positively_with_WD: bool = _f(False, "apply the metric-to-decay mapping (without it the module-wise pass only measures and logs; official default True)", group=W)
    unbalancedWD_every: int = _f(1, COMPAT + "ignored for the ViT, as in the official ViT code: the module-wise pass runs at the first update of every epoch", group=W)
    esd_metric_for_tb: str = _f("alpha", "per-module metric that drives the decay", choices=ESD_METRICS, group=W)
    assign_func: str = _f("tb_linear_map", "metric-to-decay map", choices=ASSIGN_FUNCS, group=W)
    wd_min_ratio: float = _f(0.666, "decay multiplier of the module with the smallest metric (tb_linear_map)", group=W)
    wd_max_ratio: float = _f(3.0, "decay multiplier of the module with the largest metric (tb_linear_map)", group=W)
    pl_fitting: str = _f("median", "power-law xmin choice for alpha", choices=PL_FITTINGS, group=W)
    esd_estimator: str = _f("full", "ESD that alpha is fitted on: full = the whole matrix (official); farms = pooled fixed-aspect-ratio submatrices (FARMS)", choices=ESD_ESTIMATORS, group=W)
    farms_window: int = _f(2000, "FARMS: short side of each submatrix, capped to the matrix", group=W)
    farms_aspect_ratio: float = _f(1.0, "FARMS: long side / short side of each submatrix, >= 1", group=W)
    farms_windows_per_dim: int = _f(15, "FARMS: submatrix positions along each dimension", group=W)
    farms_min_step: float = _f(0.05, "FARMS: neighbouring submatrix positions at least this fraction of the submatrix's side apart; 0 = the authors' positions", group=W)
    xmin_pos: float = _f(2.0, "median fit: xmin is eigenvalue number int(N / xmin_pos) (2 = the median)", group=W)
    filter_zeros: bool = _f(False, "drop eigenvalues <= 1e-5 before fitting", group=W)
    remove_first_layer: bool = _f(True, "leave the first Linear/Conv2d in module order (the patch embedding) at the base decay", group=W)
    remove_last_layer: bool = _f(True, "leave the last (the head) at the base decay", group=W)
    wd_exclude: list = _f([], "regular expressions; Linear/Conv2d modules whose name matches one are not tuned (repeatable)", group=W, nargs="*")
    official_fix_finger: bool = _f(False, "fix-finger fit with the official code's lower bound (a log10 value compared with linear eigenvalues)", group=W)
    batchnorm: bool = _f(True, COMPAT + "ties BatchNorm decay to convolutions; the ViT has none", group=W)
    batchnorm_type: str = _f("name", COMPAT + "no effect on the ViT", choices=("name",), group=W)

    # --- evaluation, logging, checkpoints -----------------------------------------------------------------
    output_dir: Optional[str] = _f(None, "run directory (checkpoints, metrics.jsonl, wandb, config.json); default checkpoints/<model>-<time>-<wandb_name>", group=L)
    resume: str = _f("", "resume from a checkpoint directory (model_<update>), which must verify against its manifest, or a run directory (its newest checkpoint that verifies; newer damaged ones are named and skipped)", group=L)
    auto_resume: bool = _f(False, "resume from --output_dir's newest checkpoint that verifies when it has one", group=L)
    save_ckpt: bool = _f(True, "write a checkpoint every --save_ckpt_freq epochs and at the end (a stop signal always writes one)", group=L)
    save_ckpt_freq: int = _f(1, "epochs between checkpoints", group=L)
    save_ckpt_num: int = _f(3, "checkpoints kept (the newest): older ones are deleted once a newer one is complete (as the LLaMA side's --keep_checkpoints)", group=L)
    start_epoch: int = _f(0, "must stay 0: a run starts at epoch 0 or where --resume's checkpoint left off", group=L)
    eval: bool = _f(False, "only evaluate (the initialisation, or --resume's checkpoint) and exit", group=L)
    dist_eval: bool = _f(True, COMPAT + "evaluation is always shared among the processes, every image counted once", group=L)
    disable_eval: bool = _f(False, "skip the per-epoch evaluation", group=L)
    log_every: int = _f(1, "log training metrics every this many updates", group=L)
    log_dir: Optional[str] = _f(None, COMPAT + "no TensorBoard; metrics go to metrics.jsonl and wandb", group=L)
    enable_wandb: bool = _f(True, "log to wandb too (offline unless --wandb_mode online)", group=L)
    project: str = _f("convnext", "wandb project (the official default)", group=L)
    wandb_name: str = _f("code_test", "wandb run name", group=L)
    wandb_mode: Optional[str] = _f(None, "wandb mode; default: $WANDB_MODE if set, else offline", choices=("online", "offline", "disabled"), group=L)
    wandb_ckpt: bool = _f(False, COMPAT + "checkpoints are not uploaded", group=L)
    world_size: int = _f(1, COMPAT + "the process count comes from torchrun", group=L)
    local_rank: int = _f(-1, COMPAT + "the rank comes from torchrun", group=L)
    dist_on_itp: bool = _f(False, COMPAT + "no effect", group=L)
    dist_url: str = _f("env://", COMPAT + "torchrun's environment is used", group=L)

    # ------------------------------------------------------------------------------------------------------
    @property
    def resolved_dtype(self) -> str:
        return "amp_bf16" if self.use_amp else self.dtype

    @property
    def mixup_active(self) -> bool:
        """The official test (main.py): Mixup/CutMix on when either alpha is positive or a CutMix range is set."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def min_lr_ratio(self) -> float:
        """The cosine's final learning rate as a fraction of --lr (see --min_lr and --min_lr_absolute)."""
        return self.min_lr / self.lr if self.min_lr_absolute else self.min_lr


def parse_vit_args(argv: list[str] | None = None) -> tuple[ViTConfig, set[str]]:
    """Parse the command line into a validated ViTConfig; also return the names of the flags given."""
    config, given = parse_flags(ViTConfig, argv)
    apply_method_defaults(config, given)
    check_wd_timescale(config, given)
    validate(config, given)
    return config, given


def validate(config: ViTConfig, given: set[str]) -> None:
    """Checks that need no files, processes or devices (the data and the images come later, before any compute)."""
    if config.data_path is None:
        raise UserError("--data_path is required: a directory with train/<class>/<image> and val/<class>/<image> "
                        "(ImageNet's layout), e.g. --data_path data/digits_sample.")
    resolve_model_name(config.model)
    patch = ARCHS[resolve_model_name(config.model)].patch_size
    if config.input_size <= 0 or config.input_size % patch:
        raise UserError(f"--input_size {config.input_size}: {config.model} cuts images into {patch}x{patch} patches, "
                        f"so the input size must be a positive multiple of {patch}.")
    check_dist_timeout(config.dist_timeout)
    for name in ("batch_size", "epochs", "update_freq", "lr", "log_every", "save_ckpt_freq", "save_ckpt_num",
                 "max_skipped_updates", "recount"):
        if not getattr(config, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(config, name)}.")
    for name in ("num_workers", "warmup_epochs", "min_lr", "weight_decay", "mixup", "cutmix"):
        if not getattr(config, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(config, name)}.")
    for name in ("lr", "min_lr", "opt_eps", "model_ema_decay", "drop_path", "smoothing", "reprob"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name} must be a finite number.")
    for name in ("reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"):
        if not 0 <= getattr(config, name) <= 1:
            raise UserError(f"--{name} is a probability or a decay and must be in [0, 1], got {getattr(config, name)}.")
    if not 0 <= config.drop_path < 1 or not 0 <= config.smoothing < 1:
        raise UserError(f"--drop_path and --smoothing must be in [0, 1); got {config.drop_path}, {config.smoothing}.")
    if config.min_lr_absolute and config.min_lr > config.lr:
        raise UserError(f"--min_lr_absolute: the final learning rate --min_lr {config.min_lr} exceeds --lr "
                        f"{config.lr}.")
    if not config.min_lr_absolute and config.min_lr > 1:
        raise UserError(f"--min_lr {config.min_lr} is read as a ratio of --lr (as the official code does) and must be "
                        "<= 1; add --min_lr_absolute to give the final learning rate itself.")
    if config.mixup_active and config.batch_size % 2:
        raise UserError(f"--batch_size {config.batch_size}: Mixup/CutMix pairs each image with its mirror in the "
                        "micro-batch, so the batch size must be even (or turn them off: --mixup 0 --cutmix 0).")
    if config.cutmix_minmax is not None and len(config.cutmix_minmax) != 2:
        raise UserError(f"--cutmix_minmax takes two ratios (min max), got {config.cutmix_minmax}.")
    if config.opt_betas is not None and (len(config.opt_betas) != 2 or not all(0 <= b < 1 for b in config.opt_betas)):
        raise UserError(f"--opt_betas takes two values in [0, 1), got {config.opt_betas}.")
    if config.clip_grad is not None and not config.clip_grad > 0:
        raise UserError(f"--clip_grad must be positive (omit it for no clipping), got {config.clip_grad}.")
    if config.use_amp and "dtype" in given and config.dtype != "amp_bf16":
        raise UserError(f"--use_amp true contradicts --dtype {config.dtype}; give one of them (--use_amp is "
                        "--dtype amp_bf16).")
    if config.layer_decay != 1.0:
        raise UserError(f"--layer_decay {config.layer_decay}: layer-wise learning-rate decay is not implemented (the "
                        "official code allows it for ConvNeXt models only); use 1.0.")
    if config.finetune:
        raise UserError("--finetune is not implemented; train from scratch, or resume one of our checkpoints with "
                        "--resume.")
    if config.start_epoch != 0:
        raise UserError(f"--start_epoch {config.start_epoch}: a run starts at epoch 0, or where --resume's "
                        "checkpoint left off; drop the flag.")
    if config.resume and config.auto_resume:
        raise UserError("--resume and --auto_resume both say where to resume from; give one of them.")
    if config.auto_resume and not config.output_dir:
        raise UserError("--auto_resume resumes from --output_dir's latest checkpoint; give --output_dir.")
    if config.eval and config.disable_eval:
        raise UserError("--eval (evaluate only) contradicts --disable_eval.")
    if config.model_ema_eval and not config.model_ema:
        raise UserError("--model_ema_eval evaluates the EMA, which needs --model_ema true.")
    validate_weight_decay(config)
