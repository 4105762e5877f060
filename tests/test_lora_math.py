"""kohya LoRA keys and delta math (tsm_trainer/core/lora_math.py)."""

import pytest
import torch
import torch.nn.functional as F

from tsm_trainer.core.lora_math import (
    EXPERT_KEY,
    PLAIN_KEY,
    experts_in,
    first_factor,
    lora_delta,
    module_names,
    module_ranks,
    pair_delta,
    split_key,
)


@pytest.mark.parametrize("kernel", [None, 1, 3])
def test_pair_delta_applied_once_equals_the_two_factors_applied_in_turn(kernel):
    torch.manual_seed(0)
    r, k, d = 3, 5, 7
    if kernel is None:  # Linear: up (d, r) @ down (r, k)
        down, up, x = torch.randn(r, k), torch.randn(d, r), torch.randn(4, k)
        expected, apply = F.linear(F.linear(x, down), up), F.linear
    else:  # Conv: down (r, k, kh, kw), up (d, r, 1, 1)
        down, up, x = torch.randn(r, k, kernel, kernel), torch.randn(d, r, 1, 1), torch.randn(2, k, 6, 6)
        expected, apply = F.conv2d(F.conv2d(x, down), up), F.conv2d
    delta = pair_delta(down, up, 0.5)
    assert delta.shape == (d, k) + (() if kernel is None else (kernel, kernel))
    torch.testing.assert_close(apply(x, delta), 0.5 * expected, rtol=1e-5, atol=1e-5)


def test_lora_delta_uses_the_modules_alpha_for_plain_and_expert_pairs():
    down, up = torch.randn(4, 6), torch.randn(5, 4)
    tensors = {
        "lora_unet_a.tsm.8.2.lora_down.weight": down,
        "lora_unet_a.tsm.8.2.lora_up.weight": up,
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_te_b.lora_down.weight": down,
        "lora_te_b.lora_up.weight": up,
    }
    torch.testing.assert_close(lora_delta(tensors, "lora_unet_a", "lora_unet_a.tsm.8.2"), (up @ down) * 0.5)
    torch.testing.assert_close(lora_delta(tensors, "lora_te_b"), up @ down)  # no alpha: alpha = r
    assert module_names(tensors) == ["lora_te_b", "lora_unet_a"]
    assert experts_in(tensors) == {8: [2]}
    assert first_factor(tensors, "lora_unet_a", "lora_up") is up


def test_keys_split_into_name_and_part():
    assert split_key("lora_unet_x.tsm.8.3.lora_down.weight") == ("lora_unet_x", "tsm.8.3.lora_down.weight")
    m = EXPERT_KEY.match("lora_unet_x.tsm.8.3.lora_up.weight")
    assert (m["module"], m["n"], m["e"], m["part"]) == ("lora_unet_x", "8", "3", "lora_up")
    assert PLAIN_KEY.match("lora_te_y.alpha")["name"] == "lora_te_y"
    assert PLAIN_KEY.match("lora_unet_x.tsm.8.3.lora_up.weight") is None
    assert PLAIN_KEY.match("lora_unet_x.hada_w1_a") is None


def test_module_ranks_reads_the_first_down_factor_of_each_module():
    tensors = {
        "lora_unet_a.tsm.4.0.lora_down.weight": torch.zeros(3, 8),
        "lora_unet_a.alpha": torch.tensor(3.0),
        "lora_te_b.lora_down.weight": torch.zeros(2, 8),
        "lora_te_b.lora_up.weight": torch.zeros(8, 2),
    }
    assert module_ranks(tensors) == {"lora_unet_a": 3, "lora_te_b": 2}
