"""A ViT whose state_dict equals timm's (`deit_tiny_patch16_224`; timm 0.4.5: `vit_deit_tiny_patch16_224`).

Why our own: timm needs torchvision, whose only wheel for this torch is a CUDA build that cannot be imported on a
CPU torch (shared notes, vit.md). The architecture is small, so it is written here from timm 0.4.5's
`vision_transformer.py` (the official pin) with the same module names, so that `load_state_dict` takes a timm or
DeiT checkpoint unchanged (tests/data/deit_tiny_patch16_224_state_dict.json is the key/shape list it must match):

    patch_embed.proj (Conv2d, kernel = stride = patch) -> prepend cls_token -> + pos_embed
    -> blocks.{i}: x + drop_path(attn(norm1(x))), x + drop_path(mlp(norm2(x)))   (pre-norm; fused qkv with bias)
    -> norm -> the cls token's features -> head (Linear)

LayerNorm eps is 1e-6 and GELU is exact, as in timm. Attention uses `F.scaled_dot_product_attention`, which computes
timm's softmax(q k^T / sqrt(head_dim)) v with a fused kernel on GPUs: equal up to rounding, not bit for bit (the
fused kernels order and round their sums differently from timm's explicit matmul, softmax and matmul).

Initialisation is timm 0.4.5's recipe, in its order: the modules are built in timm's order with PyTorch's default
init (the patch Conv2d keeps it: kaiming-uniform weight, uniform bias; timm never re-initialises it), then
pos_embed and cls_token get trunc_normal(std .02), then every Linear gets a trunc_normal(std .02) weight and a zero
bias and every LayerNorm weight 1, bias 0. (timm >= 0.9 changed cls_token to normal(std 1e-6); we follow the
official pin.) The truncation bounds are timm's absolute [-2, 2], i.e. none in practice at std .02. The same
distributions, not the same values for a seed: the truncated normals come from torch's `nn.init.trunc_normal_`,
which in this torch (2.13) draws normal values and redraws those out of bounds, whereas timm 0.4.5's own
`trunc_normal_` maps uniform draws through the inverse normal CDF (`uniform_`, `erfinv_`); they take other values
from the generator, so a timm model and this one built from the same seed start from different weights.

Drop path (stochastic depth) rates rise linearly from 0 at the first block to `drop_path_rate` at the last, as
timm's `torch.linspace(0, drop_path_rate, depth)`. Its random draws use the default torch generator of the input's
device: a training loop that wants exact resume saves and restores that generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alphadecay.errors import UserError

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02


@dataclass(frozen=True)
class ViTArch:
    """The shape of a registered ViT; `img_size` is its default input size (`--input_size` overrides it)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    about: str


# The official name first (timm 0.4.5's); `ALIASES` maps other spellings to these names.
ARCHS: dict[str, ViTArch] = {
    "vit_deit_tiny_patch16_224": ViTArch(
        img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
        about="DeiT-tiny, 5.7M parameters at 1000 classes: the paper's ViT-tiny (timm 0.4.5 name)"),
    # Chosen on the shipped digits (2 CPU cores, batch 64, Adam 3e-3, no augmentation): depth 4 reached 37% val
    # top-1 after 250 steps where depth 6 reached 26%, and a forward + backward costs about 60% of depth 6's.
    "vit_tiny_patch4_32": ViTArch(
        img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
        about="a CPU-sized ViT for 32 px images (0.2M parameters): demos and tests"),
}
ALIASES: dict[str, str] = {"deit_tiny_patch16_224": "vit_deit_tiny_patch16_224"}  # current timm's name


def model_names() -> list[str]:
    """Every name `build_vit` accepts: registered names, then aliases."""
    return list(ARCHS) + list(ALIASES)


def resolve_model_name(name: str) -> str:
    """The registered name for `name` (an alias maps to its target), or a UserError listing the valid names."""
    if name in ARCHS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    valid = ", ".join(f"{n} ({a.about})" for n, a in ARCHS.items())
    aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items())
    raise UserError(f"--model {name}: unknown model. Valid: {valid}; aliases: {aliases}.")


class DropPath(nn.Module):
    """Zero the residual branch of a random subset of samples and scale the rest by 1/keep (timm's formula)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep_prob) * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each projected to `embed_dim` by one strided Conv2d (timm's `patch_embed.proj`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input images are {tuple(x.shape[-2:])}, but the model was built for "
                             f"{self.img_size}x{self.img_size} (--input_size)")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, num_patches, embed_dim)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (rows: all q, then all k, then all v) and a projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(head_dim), as timm
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a class token, learned position embeddings and a linear head on the final cls features."""

    def __init__(self, *, img_size: int, patch_size: int, num_classes: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 in_chans: int = 3) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # timm's stochastic depth rule
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rates[i], qkv_bias) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        self.apply(_init_weights)

    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final-norm features of the cls token, (B, embed_dim)."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for normalised images (B, 3, img_size, img_size)."""
        return self.head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """timm 0.4.5 `VisionTransformer._init_weights` (Conv2d is left at PyTorch's default, as there)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_vit(name: str, *, num_classes: int = 1000, img_size: int | None = None,
              drop_path_rate: float = 0.0) -> VisionTransformer:
    """A freshly initialised registered ViT (float32, CPU; seed torch first for a reproducible init).

    `name` may be an alias; `img_size` (`--input_size`) defaults to the architecture's own and must be a multiple
    of its patch size (pos_embed then has (img_size / patch)^2 + 1 rows). Bad values raise a UserError naming the
    flag.
    """
    arch = ARCHS[resolve_model_name(name)]
    size = arch.img_size if img_size is None else img_size
    if size <= 0 or size % arch.patch_size:
        raise UserError(f"--input_size {size}: {name} cuts images into {arch.patch_size}x{arch.patch_size} patches, "
                        f"so the input size must be a positive multiple of {arch.patch_size} "
                        f"(its default is {arch.img_size}).")
    if num_classes < 1:
        raise UserError(f"the number of classes must be at least 1, got {num_classes}.")
    if not 0.0 <= drop_path_rate < 1.0:
        raise UserError(f"--drop_path {drop_path_rate}: a drop path rate must be in [0, 1).")
    return VisionTransformer(img_size=size, patch_size=arch.patch_size, num_classes=num_classes,
                             embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
                             mlp_ratio=arch.mlp_ratio, drop_path_rate=drop_path_rate)


def resize_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A (1, 1 + g*g, D) position embedding resized to (1, num_tokens, D): the cls row is kept and the g x g grid
    is resized bilinearly, as timm 0.4.5's `resize_pos_embed` does when a checkpoint meets another input size."""
    cls_row, grid = pos_embed[:, :1], pos_embed[0, 1:]
    old, new = round(grid.shape[0] ** 0.5), round((num_tokens - 1) ** 0.5)
    if old * old != grid.shape[0] or new * new != num_tokens - 1:
        raise ValueError(f"cannot resize a position embedding of {pos_embed.shape[1]} tokens to {num_tokens}: "
                         "both must be 1 + a square number")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear").permute(0, 2, 3, 1).reshape(1, new * new, -1)
    return torch.cat([cls_row, grid], dim=1)


def adapt_checkpoint(state: dict, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """A timm/DeiT checkpoint's model weights, ready for `model.load_state_dict(..., strict=True)`.

    Accepts a bare state_dict or DeiT's `{"model": state_dict}` file; resizes pos_embed when the checkpoint was
    trained at another input size (timm's `checkpoint_filter_fn`). Heads of another class count are left as they are,
    so a strict load says which keys differ.
    """
    weights = state.get("model", state) if isinstance(state.get("model"), dict) else state
    out = dict(weights)
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], model.pos_embed.shape[1])
    return out
