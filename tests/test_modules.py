"""Numerics of the LoRA wrappers: vanilla equivalence, per-sample routing, optimizer
isolation of unused experts, the assembling mixtures, merging."""

import copy

import pytest
import torch
from torch import nn

from tsm_trainer.core.intervals import expert_index
from tsm_trainer.core.modules import LoRAModule, TSMLoRAModule
from tsm_trainer.core.timestep import TimestepContext

torch.manual_seed(0)


def _randomise(module: nn.Module) -> None:
    """Give every parameter (lora_up starts at zero) a random value so outputs differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _linear(k=6, d=5):
    return nn.Linear(k, d)


def _conv(k=3, d=4, kernel=3):
    return nn.Conv2d(k, d, kernel, padding=kernel // 2, stride=1)


def _wrap(org, scales, mixture=None, rank=2, alpha=3.0, **kw):
    ctx = TimestepContext(1000)
    m = TSMLoRAModule("lora_unet_x", org, ctx, scales, rank, alpha, mixture=mixture, **kw)
    _randomise(m)
    m.apply_to()
    return m, ctx


@pytest.mark.parametrize("make", [_linear, _conv, lambda: _conv(kernel=1)])
def test_n1_is_vanilla_lora_by_hand(make):
    org = make()
    m, ctx = _wrap(org, [1], rank=2, alpha=3.0)
    x = torch.randn(3, 6, 7) if isinstance(org, nn.Linear) else torch.randn(3, 3, 5, 5)
    if isinstance(org, nn.Linear):
        x = x.transpose(1, 2)  # (B, L, k)
    ctx.set(torch.tensor([3.0, 500.0, 999.0]))
    pair = m.expert(1, 0)
    A, B = pair.lora_down.weight, pair.lora_up.weight
    W = org.weight.detach()
    if isinstance(org, nn.Linear):
        expected = x @ (W + (3.0 / 2) * B @ A).T + org.bias
    else:
        delta = torch.einsum("dr,rkhw->dkhw", B.flatten(1), A)
        expected = nn.functional.conv2d(x, W + (3.0 / 2) * delta, org.bias, padding=org.padding)
    torch.testing.assert_close(org(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_linear, _conv])
@pytest.mark.parametrize("scales,mixture", [([8], None), ([8, 1], "asymmetric"), ([8, 4, 1], "symmetric")])
def test_mixed_batch_equals_each_sample_alone(make, scales, mixture):
    org = make()
    m, ctx = _wrap(org, scales, mixture)
    x = torch.randn(4, 9, 6) if isinstance(org, nn.Linear) else torch.randn(4, 3, 5, 5)
    t = torch.tensor([10.0, 130.0, 131.5, 990.0])
    ctx.set(t)
    batch = org(x)
    for b in range(4):
        ctx.set(t[b : b + 1])
        torch.testing.assert_close(batch[b : b + 1], org(x[b : b + 1]), rtol=1e-5, atol=1e-5)


def test_rows_folded_into_batch_route_by_sample():
    # Video UNets reshape (B, F, ...) into (B*F, ...): rows b*F..b*F+F-1 belong to sample b.
    org = _linear()
    m, ctx = _wrap(org, [8])
    x = torch.randn(2 * 3, 4, 6)
    ctx.set(torch.tensor([10.0, 900.0]))
    out = org(x)
    for b, t in enumerate([10.0, 900.0]):
        ctx.set(torch.tensor([t]))
        torch.testing.assert_close(out[3 * b : 3 * b + 3], org(x[3 * b : 3 * b + 3]), rtol=1e-5, atol=1e-5)


def test_unused_experts_untouched_by_adamw_with_weight_decay():
    org = _linear()
    m, ctx = _wrap(org, [8])
    before = copy.deepcopy(m.state_dict())
    opt = torch.optim.AdamW([p for p in m.parameters()], lr=0.1, weight_decay=0.1)
    t = torch.tensor([10.0, 300.0, 310.0, 999.0])
    used = set(expert_index(t, 8).tolist())
    assert used == {0, 2, 7}
    ctx.set(t)
    org(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    after = m.state_dict()
    for e in range(8):
        pair = m.expert(8, e)
        for name in ("lora_down.weight", "lora_up.weight"):
            key = f"tsm.8.{e}.{name}"
            if e in used:
                assert not torch.equal(before[key], after[key]), key
            else:
                assert getattr(pair, name.split(".")[0]).weight.grad is None, key
                assert torch.equal(before[key], after[key]), key
                assert getattr(pair, name.split(".")[0]).weight not in opt.state


def test_assemble_starts_at_core_only_and_trains_only_routers():
    org = _linear()
    core = copy.deepcopy(org)
    m, ctx = _wrap(org, [8, 1], "asymmetric")
    with torch.no_grad():  # what the router's zero-init gives, after _randomise
        m.router.fc.weight.zero_()
        m.router.fc.bias.zero_()
        m.router.embedding.zero_()
    core_m = TSMLoRAModule("c", core, TimestepContext(), [8], 2, 3.0)
    core_m.tsm["8"].load_state_dict(m.tsm["8"].state_dict())
    core_m.apply_to()
    t = torch.tensor([10.0, 500.0, 990.0])
    ctx.set(t)
    core_m.context.set(t)
    x = torch.randn(3, 6)
    torch.testing.assert_close(org(x), core(x), rtol=1e-6, atol=1e-6)

    m.tsm.requires_grad_(False)
    org(x).pow(2).sum().backward()
    assert m.router.fc.weight.grad is not None and m.router.fc.weight.grad.abs().sum() > 0
    assert m.router.embedding.grad[t.long()].abs().sum() > 0
    assert all(p.grad is None for p in m.tsm.parameters())


def _gated_reference(m, x, t, mixture):
    """Hand computation of docs/design.md section 2 for one sample (x: (1, k))."""
    W, bias = m.org_module.weight, m.org_module.bias
    pooled = x.mean(0, keepdim=True) if x.dim() == 2 else x
    g = m.router.fc(pooled)[0] + m.router.embedding[int(t)]
    out = x @ W.T + bias
    for j, n in enumerate(m.scales):
        pair = m.expert(n, expert_index(t, n))
        lora = x @ pair.lora_down.weight.T @ pair.lora_up.weight.T * m.scale
        if mixture == "asymmetric":
            out = out + (lora if j == 0 else g[j - 1] * lora)
        else:
            out = out + g[j] * lora
    return out


@pytest.mark.parametrize("mixture", ["asymmetric", "symmetric"])
def test_mixtures_follow_the_design_formula(mixture):
    org = _linear()
    m, ctx = _wrap(org, [8, 4, 1], mixture)
    assert m.router.fc.weight.shape == ((2 if mixture == "asymmetric" else 3), 6)
    assert m.router.embedding.shape == (1000, 2 if mixture == "asymmetric" else 3)
    for t in (5.0, 400.0, 999.0):
        x = torch.randn(1, 6)
        ctx.set(torch.tensor([t]))
        torch.testing.assert_close(org(x), _gated_reference(m, x, t, mixture), rtol=1e-5, atol=1e-5)


def test_symmetric_at_init_is_the_base_model_asymmetric_is_core():
    for mixture, expect_base in (("symmetric", True), ("asymmetric", False)):
        org = _linear()
        m, ctx = _wrap(org, [8, 1], mixture)
        with torch.no_grad():
            m.router.fc.weight.zero_()
            m.router.fc.bias.zero_()
            m.router.embedding.zero_()
        x = torch.randn(2, 6)
        ctx.set(torch.tensor([1.0, 999.0]))
        base = x @ org.weight.T + org.bias
        assert torch.allclose(org(x), base) == expect_base


def test_merge_expert_and_restore_are_exact():
    for org in (_linear(), _conv()):
        m, ctx = _wrap(org, [8])
        w0 = org.weight.detach().clone()
        x = torch.randn(2, 6) if isinstance(org, nn.Linear) else torch.randn(2, 3, 5, 5)
        ctx.set(torch.tensor([260.0, 300.0]))  # both expert 2
        lora_out = org(x)
        m.merge_expert(8, 2)
        m.remove()
        torch.testing.assert_close(org(x), lora_out, rtol=1e-5, atol=1e-5)
        m.restore_weights()
        assert torch.equal(org.weight, w0)


def test_no_timestep_is_a_clear_error():
    org = _linear()
    _wrap(org, [8])
    with pytest.raises(RuntimeError, match="lora_unet_x was called with no timestep set"):
        org(torch.randn(1, 6))


def test_dropouts_only_in_training_and_plain_lora():
    org = _linear()
    m = LoRAModule("lora_te_x", org, 2, 2.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    _randomise(m)
    m.apply_to()
    x = torch.randn(8, 6)
    m.eval()
    ref = x @ (org.weight + m.scale * m.lora_up.weight @ m.lora_down.weight).T + org.bias
    torch.testing.assert_close(org(x), ref, rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(0)
    outs = {tuple(org(x).flatten()[:4].tolist()) for _ in range(20)}
    assert len(outs) > 1  # stochastic in training
    m.remove()
    torch.testing.assert_close(org(x), x @ org.weight.T + org.bias)


def test_two_wrappers_on_one_layer_stack_and_unstack_in_reverse_order():
    org = _linear()
    x = torch.randn(2, 6)
    base = org(x)
    first = LoRAModule("a", org, 2, 2.0)
    second = LoRAModule("b", org, 2, 2.0)
    _randomise(first)
    _randomise(second)
    first.apply_to()
    one = org(x)
    second.apply_to()
    both = org(x)
    torch.testing.assert_close(both - one, one - base, rtol=1e-5, atol=1e-6)  # same weights: same delta again
    with pytest.raises(RuntimeError, match="remove that one first"):
        first.remove()
    second.remove()
    torch.testing.assert_close(org(x), one)
    first.remove()
    torch.testing.assert_close(org(x), base)
