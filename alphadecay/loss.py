"""The training loss: next-token cross-entropy, optionally over chunks of tokens so that no fp32 logits of a whole
micro-batch ever exist.

Why: the logits are the largest activation of a small LLaMA. At the paper's 130M micro-batch of 256 rows x 256
tokens with a 32,000-token vocabulary, the bf16 logits are 4 GiB and their fp32 upcast for the log-softmax
(needed for honest numerics) 8 GiB more, kept for the backward pass together with the log-softmax output: about
12-16 GiB of a ~51 GiB peak (shared/notes/gpu-and-data.md). With `--loss_chunk_tokens N` the head and the loss
are computed N tokens at a time and at most one chunk of logits is alive.

Plain chunking under autograd would not help: each chunk's logits would be saved for the backward pass, so all
of them would be alive at its start. `_ChunkedHeadCrossEntropy` is a custom autograd Function that, chunk by
chunk in the forward pass, computes the loss AND its gradients with respect to the hidden states and the head
weight (d loss / d logits = softmax - one-hot), then drops the chunk's logits; the backward pass only multiplies
the stored gradients by the incoming scalar (the approach of Liger-Kernel's fused linear cross-entropy). The
head's FLOPs are the same as in the unchunked forward + backward, nothing is recomputed; what is stored instead of
the logits is one gradient the size of the hidden states and one the size of the head weight (accumulated in
float32: each chunk's product is added in float32, and rounded to the weight's dtype once, in backward).

Numerics as in the unchunked path: each chunk's logits are computed in the model's dtype (the head matmul in
bf16 under pure bf16), upcast to float32 for the log-softmax, the gradient of the logits is cast back to the
model's dtype before its matmuls (what autograd does through `.float()`). Differences from the unchunked loss are
rounding: sums in another order, and the head-weight gradient accumulated over chunks in float32 instead of inside
one matmul (one rounding to bf16 at the end in both; tested to within one bf16 unit in the last place). In float64
both are equal to rounding (tested).

`CausalLMLoss` puts the model and the loss in one module whose forward is the whole training computation, so that
DistributedDataParallel's gradient hooks and torch.compile see one forward; `row_loss_sums` is the evaluation-side
counterpart (per-row sums, no gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alphadecay.data import IGNORE_INDEX


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the positions that predict them: labels[:, 1:] padded with IGNORE_INDEX.

    Shifting the labels, not the logits: slicing the (B, T, V) logits would copy them."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_count(labels: torch.Tensor) -> int:
    """Target positions (predicted tokens) in a batch of labels: the denominator of the token-mean loss."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions; float32 and float64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(_upcast_dtype(x.dtype))


def full_token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target positions of the next-token cross-entropy from the whole micro-batch's logits, upcast to
    float32 or better (the reference: `--loss_chunk_tokens 0`)."""
    logits = _upcast(model(input_ids=input_ids).logits)
    return F.cross_entropy(logits.flatten(0, 1), shift_targets(labels).flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with the product delivered in acc's dtype (float32 for bf16 or fp16 a, b), never rounded to
    the inputs' dtype first: the head-weight gradient is then rounded once, after the last chunk, as the
    unchunked matmul rounds it, instead of once per chunk.

    On CUDA a half-precision matmul with a float32 output (`torch.mm(..., out_dtype=torch.float32)`, which
    inductor lowers as a matmul with a float32 output; `addmm` with a float32 `self` and bf16 matrices is refused
    by some torch versions' CUDA kernel, hence mm and an add), elsewhere (torch 2.13 has no CPU kernel for it) a
    float32 matmul of the upcast inputs: products of bf16 values are exact in float32, so both give the same sum
    up to the order of the float32 additions."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weightᵀ, target_i) over valid targets; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden (N, H) and weight (V, H) in the model's dtype; targets (N,) with IGNORE_INDEX where no target.
        loss = torch.zeros((), dtype=_upcast_dtype(hidden.dtype), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=_upcast_dtype(weight.dtype), device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = _upcast(h @ weight.t())  # (n, V): the only logits alive
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0).unsqueeze(1)
            target_logit = logits.gather(1, safe).squeeze(1)
            # log-sum-exp as torch.logsumexp computes it, but in place: no second (n, V) buffer.
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - one-hot, zero where there is no target; in place on the logits.
            grad = exp.div_(sum_exp)
            grad.scatter_add_(1, safe, -torch.ones_like(safe, dtype=grad.dtype))
            grad.mul_(valid.unsqueeze(1))
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                _accumulate_product(grad_weight, grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                              chunk_tokens: int) -> torch.Tensor:
    """sum over valid targets of CE(hidden @ weightᵀ, target), never holding more than `chunk_tokens` rows of
    logits. hidden (N, H), weight (V, H), targets (N,) with IGNORE_INDEX for positions without a target."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    loss = torch.zeros((), dtype=_upcast_dtype(hidden.dtype), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = _upcast(hidden[start:start + chunk_tokens] @ weight.t())
        loss += F.cross_entropy(logits, targets[start:start + chunk_tokens], ignore_index=IGNORE_INDEX,
                                reduction="sum")
    return loss


def _hidden_and_head(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """The final (normed) hidden states (B, T, H) and the output Linear of a transformers causal LM."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    return hidden, model.get_output_embeddings()


class CausalLMLoss(nn.Module):
    """A causal LM and its loss as one module: forward(input_ids, labels) -> sum over target positions of the
    next-token cross-entropy (labels shifted inside; IGNORE_INDEX positions, e.g. pads, count for nothing).

    This is what the trainer runs, wraps in DistributedDataParallel and torch.compile's: the gradient hooks and
    the compiled graph then cover the head and the loss too. `model` (a transformers LlamaForCausalLM) stays the
    module everything else reads (spectral passes, diagnostics, checkpoints, save_pretrained): its parameters
    are this module's, under the prefix `model.`.

    chunk_tokens 0: the whole micro-batch's logits, upcast (as transformers' own loss); N > 0: the head and the
    loss over N tokens at a time (`_ChunkedHeadCrossEntropy`)."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 0):
        super().__init__()
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens == 0:
            return full_token_loss_sum(self.model, input_ids, labels)
        hidden, head = _hidden_and_head(self.model, input_ids)
        return chunked_cross_entropy_sum(hidden.flatten(0, 1), head.weight, shift_targets(labels).flatten(),
                                         chunk_tokens=self.chunk_tokens)


@torch.no_grad()
def row_loss_sums(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                  chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of its next-token losses (float64) and its number of targets (int64), for evaluation.

    model: a transformers causal LM (the raw model, not CausalLMLoss). The logits are upcast to float32 (as in
    training) and each token's loss is summed per row in float64. chunk_tokens 0: the whole batch's logits at
    once; N > 0: N tokens at a time (no fp32 logits of the whole batch exist)."""
    targets = shift_targets(labels)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if chunk_tokens <= 0:
        logits = _upcast(model(input_ids=input_ids).logits)
        token_losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="none")
    else:
        hidden, head = _hidden_and_head(model, input_ids)
        hidden, flat = hidden.flatten(0, 1), targets.flatten()
        token_losses = torch.cat([
            F.cross_entropy(_upcast(head(hidden[s:s + chunk_tokens])), flat[s:s + chunk_tokens],
                            ignore_index=IGNORE_INDEX, reduction="none")
            for s in range(0, flat.shape[0], chunk_tokens)])
    sums = token_losses.view_as(targets).double().sum(dim=1)
    return sums, counts.to(torch.int64)
