"""AdaDecay (Nakamura & Hong, IEEE Access 2019) as the AlphaDecay paper ran it: its baseline2.

The original method rescales decay per parameter, every step, by 2*sigmoid(alpha * z) of the gradient magnitude
z-scored within a layer. The paper's port (official-code.md §4.2) is coarser, and this is what we reproduce:
one score per Linear module, the Frobenius norm of its gradient (after the DDP all-reduce); z-scored within each
transformer block; multiplier 2*sigmoid(4 z); refreshed at update 0 (all norms are the placeholder 10 there, so
the decay starts at the base value; the official code's integer placeholder gives decay 0 instead until the
first in-loop pass, which --official_adadecay_init reproduces) and every --unbalancedWD_every updates. It is the
module-wise machinery of AlphaDecay with another score and map, so it is built from it rather than copied; it
computes no eigenvalues.

On the ViT (timing 'vit') the blocks are the ViT's `blocks.<i>` (4 modules each: qkv, attn.proj, fc1, fc2), as the
official code's `name.split('.')[2]` gives on its DDP-wrapped names, and the pass runs at the first update of every
epoch on that update's gradient (no placeholder pass: the official ViT init pass is overwritten before any step).
"""

from __future__ import annotations

from torch import nn

from alphadecay.wd.methods.modulewise import ModulewiseDecay, from_options


def build(model: nn.Module, optimizer, options: dict) -> ModulewiseDecay:
    """adadecay (or the official --use_modulewise_wd --esd_metric_for_tb gradnorm --assign_func layerwise_sigmoid)."""
    return from_options(model, options)
