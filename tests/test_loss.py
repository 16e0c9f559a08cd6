"""The chunked cross-entropy (alphadecay/loss.py): value and gradients equal to the full-logits reference, no
whole-batch logits kept for backward, per-row evaluation sums, and the trainer's update unchanged by chunking."""

import pytest
import torch
import torch.nn.functional as F

from alphadecay import dist
from alphadecay.config import parse_args
from alphadecay.data import IGNORE_INDEX
from alphadecay.loss import CausalLMLoss, chunked_cross_entropy_sum, full_token_loss_sum, row_loss_sums
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.wd.groups import module_param_groups
from alphadecay.trainer import Trainer
from tests.conftest import TINY_CONFIG

CPU1 = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def head_problem(n=45, hidden=12, vocab=97, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[::4] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 1000])
def test_chunked_value_and_gradients_equal_the_full_logits_reference_in_float64(chunk):
    h, w, t = head_problem()
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(ref * 0.37, (h, w))  # a non-unit upstream gradient, as the trainer's scale
    loss = chunked_cross_entropy_sum(h, w, t, chunk_tokens=chunk)
    got_h, got_w = torch.autograd.grad(loss * 0.37, (h, w))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-12, atol=1e-15)


def test_chunked_gradient_only_for_the_inputs_that_need_one():
    h, w, t = head_problem()
    w = w.detach()
    ref_h, = torch.autograd.grad(F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum"), (h,))
    got_h, = torch.autograd.grad(chunked_cross_entropy_sum(h, w, t, chunk_tokens=10), (h,))
    torch.testing.assert_close(got_h, ref_h, rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # the evaluation path: no gradient work at all, same value
        value = chunked_cross_entropy_sum(h, w, t, chunk_tokens=10)
    assert not value.requires_grad
    torch.testing.assert_close(value, F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum"))


def test_bf16_chunks_upcast_logits_and_are_as_accurate_as_the_upcast_reference():
    h, w, t = head_problem(n=64, hidden=32, vocab=301, dtype=torch.bfloat16)
    ref = F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss = chunked_cross_entropy_sum(h, w, t, chunk_tokens=16)
    got_grads = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in got_grads)
    # The same fp32 log-softmax of the same bf16 logits: the loss differs only by the order of fp32 sums.
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    # Gradients: both carry bf16 rounding; against the float64 truth the chunked one is no worse than the reference.
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = torch.autograd.grad(F.cross_entropy(h64 @ w64.t(), t, ignore_index=IGNORE_INDEX, reduction="sum"),
                                (h64, w64))
    for got, ref_grad, exact in zip(got_grads, ref_grads, truth):
        ref_error = (ref_grad.double() - exact).norm() / exact.norm()
        error = (got.double() - exact).norm() / exact.norm()
        assert ref_error < 1e-2 and error <= 1.01 * ref_error, (float(error), float(ref_error))


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a − b| over bf16 tensors, in units in the last place of the larger of the two values."""
    a, b = a.double(), b.double()
    exponent = torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp(min=1e-38)))
    return ((a - b).abs() / 2.0 ** (exponent - 7)).max().item()


def zero_head_problem(n=512, hidden=32, vocab=256, seed=0, device="cpu"):
    """bf16 hidden states, a zero head weight and targets, with the exact head-weight gradient (float64): every
    logit is 0, so d loss / d logits = 1/256 − one-hot is exact in bf16 on every path, and only the sum over
    tokens can round."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).bfloat16().to(device).requires_grad_()
    w = torch.zeros(vocab, hidden, dtype=torch.bfloat16, device=device, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[::4] = IGNORE_INDEX
    valid = t != IGNORE_INDEX
    d_logits = torch.full((n, vocab), 1 / vocab, dtype=torch.float64) * valid[:, None]
    d_logits[valid.nonzero()[:, 0], t[valid]] -= 1
    return h, w, t.to(device), (d_logits.T @ h.detach().cpu().double())


@pytest.mark.parametrize("chunk", [7, 16])
def test_bf16_head_weight_gradient_is_rounded_once_as_the_unchunked_one(chunk):
    """The head-weight gradient is summed over chunks in float32 and rounded to bf16 once, at the end, as the
    unchunked matmul rounds it: both within one unit in the last place of the exact gradient (rounding each
    chunk's product to bf16 before the sum, K roundings, is 100-300 units off where contributions cancel)."""
    h, w, t, exact = zero_head_problem()
    whole, = torch.autograd.grad(F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGNORE_INDEX,
                                                 reduction="sum"), (w,))
    got, = torch.autograd.grad(chunked_cross_entropy_sum(h, w, t, chunk_tokens=chunk), (w,))
    assert got.dtype == whole.dtype == torch.bfloat16
    assert bf16_ulps(whole, exact) <= 1 and bf16_ulps(got, exact) <= 1


def saved_tensor_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for the backward pass while `fn` runs."""
    shapes = []

    def pack(x):
        shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return shapes


def test_chunked_loss_keeps_no_logits_for_backward_and_the_full_loss_does():
    h, w, t = head_problem(n=40, hidden=8, vocab=211)
    full = saved_tensor_shapes(lambda: F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum"))
    chunked = saved_tensor_shapes(lambda: chunked_cross_entropy_sum(h, w, t, chunk_tokens=8))
    assert (40, 211) in full
    assert sorted(chunked) == sorted([(40, 8), (211, 8)])  # d loss/d hidden and d loss/d head weight only


def tiny_model(dtype=torch.float64, seed=0):
    return build_model(load_model_config(TINY_CONFIG), seed=seed).to(dtype)


def padded_rows(rows=3, length=20, seed=1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 8000, (rows, length), generator=gen)
    labels = input_ids.clone()
    for r in range(rows):
        labels[r, 6 + 5 * r:] = IGNORE_INDEX
    return input_ids, labels


def test_causal_lm_loss_chunked_equals_full_logits_in_value_and_every_parameter_gradient():
    input_ids, labels = padded_rows()
    grads = {}
    for chunk in (0, 13):
        model = tiny_model()
        loss = CausalLMLoss(model, chunk_tokens=chunk)(input_ids, labels)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[13][0], grads[0][0], rtol=1e-13, atol=0)
    assert grads[13][1].keys() == grads[0][1].keys() and "lm_head.weight" in grads[0][1]
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[13][1][name], g, rtol=1e-10, atol=1e-14, msg=name)
    # And the unchunked module is transformers' own loss (float32): the token mean times the number of targets.
    model = tiny_model(torch.float32)
    hf = model(input_ids=input_ids, labels=labels).loss
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(full_token_loss_sum(model, input_ids, labels) / targets, hf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [0, 7, 60])
def test_row_loss_sums_match_the_full_logits_per_row(dtype, chunk):
    model = tiny_model(dtype)
    input_ids, labels = padded_rows()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.double()
    expected_sums, expected_counts = [], []
    for r in range(input_ids.shape[0]):
        targets = labels[r, 1:]
        keep = targets != IGNORE_INDEX
        per_token = F.cross_entropy(logits[r, :-1][keep], targets[keep], reduction="none")
        expected_sums.append(per_token.sum())
        expected_counts.append(int(keep.sum()))
    sums, counts = row_loss_sums(model, input_ids, labels, chunk_tokens=chunk)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert counts.tolist() == expected_counts
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(sums, torch.stack(expected_sums), rtol=tolerance, atol=0)


def one_update(chunk: int):
    config, _ = parse_args(["--optimizer", "adamw", "--weight_decay", "0.1", "--lr", "1e-2", "--model_config",
                            TINY_CONFIG, "--loss_chunk_tokens", str(chunk)])
    raw = tiny_model()
    optimizer = build_optimizer(module_param_groups(raw, 0.1), config, CPU1.device)
    trainer = Trainer.for_updates(config, CPU1, raw, optimizer)
    input_ids, labels = padded_rows(rows=4)
    micro = [{"input_ids": input_ids[:2], "labels": labels[:2]}, {"input_ids": input_ids[2:], "labels": labels[2:]}]
    outcome = trainer.train_step(micro)
    return outcome.loss_sum / outcome.counts[0], raw.state_dict()


def test_train_step_with_a_chunked_loss_gives_the_same_update():
    loss_full, params_full = one_update(0)
    loss_chunked, params_chunked = one_update(9)
    assert loss_chunked == pytest.approx(loss_full, rel=1e-13)
    for key, value in params_full.items():
        torch.testing.assert_close(params_chunked[key], value, rtol=1e-10, atol=1e-13, msg=key)


def test_the_trainer_refuses_the_raw_model_as_its_training_module():
    config, _ = parse_args(["--model_config", TINY_CONFIG])
    raw = tiny_model()
    with pytest.raises(TypeError, match="CausalLMLoss"):
        Trainer(config=config, info=CPU1, model=raw, raw_model=raw, optimizer=None, wd_scheduler=None,
                train_batches=None, eval_rows=None, row_spec=None, logger=None, run_dir="", total_steps=0, grad_accum=1,
                autocast=None, state=None)
