"""How t reaches the modules (docs/design.md section 3)."""

import pytest
import torch
from torch import nn

from tests.tiny_models import tiny_unet
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.core.timestep import TimestepCapture, TimestepContext


class DiffusersStyle(nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states=None):
        return sample


class SdxlStyle(nn.Module):  # sd-scripts SdxlUNet2DConditionModel.forward(x, timesteps=None, context=None, y=None)
    def forward(self, x, timesteps=None, context=None, y=None):
        return x


class MMDiT(nn.Module):  # sd-scripts: forward(x, t, y=None, context=None), t = sigma * 1000
    def forward(self, x, t, y=None, context=None):
        return x


class Flux(nn.Module):  # sd-scripts: forward(img, img_ids, txt, txt_ids, timesteps, y, ...), timesteps = sigma
    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        return img


def _captured(model, call, **kw):
    ctx = TimestepContext(1000)
    TimestepCapture(model, ctx, **kw)
    call(model)
    return ctx.t.tolist()


def test_positional_keyword_0d_and_batched():
    x = torch.zeros(3, 4)
    m = DiffusersStyle()
    assert _captured(m, lambda m: m(x, torch.tensor(7))) == [7.0, 7.0, 7.0]
    assert _captured(m, lambda m: m(x, 7)) == [7.0, 7.0, 7.0]
    assert _captured(m, lambda m: m(x, timestep=torch.tensor([1, 2, 3]))) == [1.0, 2.0, 3.0]
    assert _captured(m, lambda m: m(sample=x, timestep=torch.tensor([999.5]))) == [999.5] * 3
    assert _captured(SdxlStyle(), lambda m: m(x, torch.tensor([5, 6, 7]), None, None)) == [5.0, 6.0, 7.0]
    assert _captured(SdxlStyle(), lambda m: m(x, timesteps=torch.tensor(4.25))) == [4.25] * 3


def test_fractional_and_flow_conventions():
    x = torch.zeros(2, 4)
    # SD3 / MMDiT receive sigma * 1000 already on the 0..T axis.
    assert _captured(MMDiT(), lambda m: m(x, torch.tensor([0.5, 0.125]) * 1000)) == [500.0, 125.0]
    # Flux receives sigma: the capture multiplies by T.
    sig = torch.tensor([0.5, 0.999])
    got = _captured(Flux(), lambda m: m(x, None, None, None, sig, None))
    assert got == pytest.approx([500.0, 999.0])
    got = _captured(Flux(), lambda m: m(img=x, img_ids=None, txt=None, txt_ids=None, timesteps=sig, y=None))
    assert got == pytest.approx([500.0, 999.0])


def test_mismatched_batch_and_missing_timestep_are_errors():
    m = DiffusersStyle()
    TimestepCapture(m, TimestepContext())
    with pytest.raises(ValueError, match="timestep has 2 values but the batch has 3"):
        m(torch.zeros(3, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="called without its timestep argument 'timestep'"):
        m(torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match="cannot find the timestep argument"):
        TimestepCapture(nn.Linear(2, 2), TimestepContext())


def _net(unet, scales=(8,), seed=0):
    net = TSMNetwork(TSMConfig(scales=list(scales), rank=2, alpha=2), unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_up" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    net.apply()
    net.attach(unet)
    return net


def _inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 16, generator=g)


def test_two_networks_in_one_process_do_not_interfere():
    unet_a, unet_b = tiny_unet(seed=0), tiny_unet(seed=0)
    net_a, net_b = _net(unet_a), _net(unet_b)
    x, c = _inputs()
    out_a = unet_a(x, torch.tensor([10, 900]), c).sample
    out_b = unet_b(x, torch.tensor([900, 10]), c).sample  # sets only net_b's t
    assert net_a.context.t.tolist() == [10.0, 900.0]
    assert net_b.context.t.tolist() == [900.0, 10.0]
    # net_a's modules still route by their own t: same output as a fresh call.
    torch.testing.assert_close(unet_a(x, torch.tensor([10, 900]), c).sample, out_a)
    assert not torch.allclose(out_a, out_b)


def test_module_without_timestep_raises():
    unet = tiny_unet()
    net = _net(unet)
    net.context.clear()
    block = unet.down_blocks[0].attentions[0]
    with pytest.raises(RuntimeError, match="called with no timestep set"):
        block(torch.randn(1, 8, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16))


def _grads(checkpointing: bool):
    unet = tiny_unet(seed=0)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    net = _net(unet)
    x, c = _inputs()
    # Two calls with different t before one backward: recomputation must use each call's t.
    loss = unet(x, torch.tensor([10, 900]), c).sample.pow(2).mean()
    loss = loss + unet(x, torch.tensor([500, 400]), c).sample.pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = _grads(False), _grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)
