"""Sampling-time application of TSM files (tsm_trainer.runtime), the core of the UI adapters."""

import functools

import pytest
import torch
from diffusers import DDIMScheduler

from tests.tiny_models import randomise as _randomise, tiny_unet, write_assembled_file
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.file_format import TSMFileError, load_file
from tsm_trainer.intervals import expert_index
from tsm_trainer.key_names import diffusers_lora_name_to_sgm, diffusers_unet_to_sgm, lora_name
from tsm_trainer.runtime import ExpertSwitcher, OnlineTSM, resolve_layers, sgm_layer_index
from tsm_trainer.targets import all_layers, layers_by_lora_name




@pytest.fixture(scope="module")
def foster_file(tmp_path_factory):
    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0, conv_rank=2), tiny_unet())
    _randomise(net)
    path = str(tmp_path_factory.mktemp("f") / "f8.safetensors")
    net.save(path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)


@functools.lru_cache(maxsize=None)
def _reference(path, t):
    unet = tiny_unet()
    net = TSMNetwork.from_file(path, unet)
    net.apply()
    net.attach(unet)
    x, c = _inputs()
    with torch.no_grad():
        return unet(x, torch.tensor([t, t]), c).sample


@pytest.mark.parametrize("steps", [4, 8, 30])
def test_switcher_follows_the_timestep_and_merges_once_per_crossing(foster_file, steps):
    tensors, meta = load_file(foster_file)
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    names = sorted({k.split(".", 1)[0] for k in tensors})
    switcher = ExpertSwitcher(tensors, meta, resolve_layers(names, layers_by_lora_name(unet), foster_file))
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x, c = _inputs()
    visited = []
    for t in sched.timesteps:
        e = switcher.set_timestep(t)
        assert e == expert_index(int(t), 8)
        if not visited or visited[-1] != e:
            visited.append(e)
        if t in sched.timesteps[:: max(1, steps // 4)]:  # spot-check outputs against training-time TSM
            with torch.no_grad():
                out = unet(x, torch.tensor([int(t)] * 2), c).sample
            torch.testing.assert_close(out, _reference(foster_file, int(t)), rtol=1e-4, atol=1e-5)
    assert switcher.merges == len(visited) <= 8
    switcher.restore()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


def test_online_path_equals_the_network_for_assembled_files(tmp_path):
    path = write_assembled_file(tmp_path, "a.safetensors")

    tensors, meta = load_file(path)
    target = tiny_unet()
    names = sorted({k.split(".", 1)[0] for k in tensors})
    online = OnlineTSM(tensors, meta, resolve_layers(names, layers_by_lora_name(target), path))
    x, c = _inputs()
    for t in (10, 400, 990):
        online.set_timestep(float(t), 2)
        with torch.no_grad():
            torch.testing.assert_close(target(x, torch.tensor([t, t]), c).sample, _reference(path, t),
                                       rtol=1e-4, atol=1e-5)
    online.restore()
    with torch.no_grad():
        torch.testing.assert_close(target(x, torch.tensor([5, 5]), c).sample, tiny_unet()(x, torch.tensor([5, 5]), c).sample)
    with pytest.raises(TSMFileError, match="ExpertSwitcher takes fostered files"):
        ExpertSwitcher(tensors, meta, {})


def test_sd1_file_names_resolve_on_an_sgm_layout_unet():
    # SD1 layout: 4 blocks, 2 layers each, attention in down 0-2 and up 1-3.
    unet = tiny_unet(block_out_channels=(8, 8, 8, 8), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    for path, _ in all_layers(unet):
        try:
            sgm = diffusers_unet_to_sgm(path, 2, frozenset({1, 2, 3}))
        except ValueError:
            continue
        assert diffusers_lora_name_to_sgm(lora_name("lora_unet", path)) == lora_name("lora_unet", sgm), path
    # An "SGM model" whose module paths are the SGM names resolves a diffusers-named file.
    sgm_model = torch.nn.Module()
    layer = torch.nn.Linear(8, 8)
    sgm_model.add_module("input_blocks", torch.nn.ModuleDict({"4": torch.nn.ModuleDict({"1": torch.nn.ModuleDict({"proj_in": layer})})}))
    index = sgm_layer_index(sgm_model)
    assert resolve_layers(["lora_unet_down_blocks_1_attentions_0_proj_in"], index) == \
        {"lora_unet_down_blocks_1_attentions_0_proj_in": layer}
    with pytest.raises(TSMFileError, match="not in this model"):
        resolve_layers(["lora_unet_nowhere"], index)


def test_switcher_rejects_a_file_whose_shapes_do_not_fit(foster_file):
    tensors, meta = load_file(foster_file)
    other = tiny_unet(cross_attention_dim=24)
    names = sorted({k.split(".", 1)[0] for k in tensors})
    with pytest.raises(TSMFileError, match="attn2_to_k.*does not fit the layer's weight"):
        ExpertSwitcher(tensors, meta, resolve_layers(names, layers_by_lora_name(other), foster_file))
