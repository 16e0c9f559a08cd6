"""alphadecay.vit.ema: the EMA update against a hand computation, buffers, wrappers, and resume. CPU, seconds."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from alphadecay.vit.ema import ModelEma, unwrap
from alphadecay.vit.model import build_vit


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def set_model(model: Tiny, weight, bias, running, count) -> None:
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(weight))
        model.linear.bias.copy_(torch.tensor(bias))
        model.running.copy_(torch.tensor(running))
        model.count.fill_(count)


def test_update_equals_a_hand_computation():
    model = Tiny()
    set_model(model, [[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5], [10.0, 20.0], 7)
    ema = ModelEma(model, decay=0.9)
    set_model(model, [[2.0, 0.0], [3.0, 8.0]], [1.5, 0.5], [0.0, 40.0], 9)
    ema.update(model)
    # 0.9 * old + 0.1 * new, worked out by hand
    assert torch.allclose(ema.module.linear.weight, torch.tensor([[1.1, 1.8], [3.0, 4.4]]))
    assert torch.allclose(ema.module.linear.bias, torch.tensor([0.6, -0.4]))
    assert torch.allclose(ema.module.running, torch.tensor([9.0, 22.0]))  # float buffers are averaged
    assert ema.module.count.item() == 9  # integer buffers are copied
    ema.update(model)  # a second step averages again, from the new EMA (no warm-up, constant decay)
    assert torch.allclose(ema.module.linear.weight, torch.tensor([[1.19, 1.62], [3.0, 4.76]]))


def test_update_is_timms_expression_bit_for_bit():
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    ema = ModelEma(model, decay=0.9999)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for name, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[name], before[name] * 0.9999 + (1.0 - 0.9999) * value)


def test_copy_is_detached_frozen_and_in_eval_mode():
    model = Tiny().train()
    ema = ModelEma(model, decay=0.5)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    assert not torch.equal(ema.module.linear.weight, model.linear.weight)  # a copy, not a view


def test_state_dict_round_trip_and_loads_into_a_bare_model():
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    ema = ModelEma(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update(model)
    restored = ModelEma(build_vit("vit_tiny_patch4_32", num_classes=10), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    bare = build_vit("vit_tiny_patch4_32", num_classes=10)
    bare.load_state_dict(ema.state_dict(), strict=True)  # the EMA checkpoint is a model checkpoint


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Tiny()
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert unwrap(wrapped) is model
        ema = ModelEma(wrapped, decay=0.0)  # decay 0: the EMA is the model
        assert set(ema.state_dict()) == set(model.state_dict())
        with torch.no_grad():
            model.linear.weight.fill_(3.0)
        ema.update(wrapped)
        assert torch.all(ema.module.linear.weight == 3.0)
    finally:
        dist.destroy_process_group()
