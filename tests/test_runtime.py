"""Sampling-time application of TSM files (tsm_trainer.runtime.online), the core of the UI adapters."""

import functools

import pytest
import torch
from diffusers import DDIMScheduler

from tests.tiny_models import randomise as _randomise
from tests.tiny_models import tiny_unet, write_assembled_file
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.core.file_format import TSMFileError, load_file
from tsm_trainer.core.intervals import expert_index
from tsm_trainer.core.key_names import diffusers_lora_name_to_sgm, diffusers_unet_to_sgm, lora_name
from tsm_trainer.core.targets import all_layers, layers_by_lora_name
from tsm_trainer.runtime.online import ExpertSwitcher, OnlineTSM, resolve_layers, sgm_layer_index


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


@functools.cache
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
            torch.testing.assert_close(
                target(x, torch.tensor([t, t]), c).sample, _reference(path, t), rtol=1e-4, atol=1e-5
            )
    online.restore()
    with torch.no_grad():
        torch.testing.assert_close(
            target(x, torch.tensor([5, 5]), c).sample, tiny_unet()(x, torch.tensor([5, 5]), c).sample
        )
    with pytest.raises(TSMFileError, match="ExpertSwitcher takes fostered files"):
        ExpertSwitcher(tensors, meta, {})


def test_sd1_file_names_resolve_on_an_sgm_layout_unet():
    # SD1 layout: 4 blocks, 2 layers each, attention in down 0-2 and up 1-3.
    unet = tiny_unet(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    for path, _ in all_layers(unet):
        try:
            sgm = diffusers_unet_to_sgm(path, 2, frozenset({1, 2, 3}))
        except ValueError:
            continue
        assert diffusers_lora_name_to_sgm(lora_name("lora_unet", path)) == lora_name("lora_unet", sgm), path
    # An "SGM model" whose module paths are the SGM names resolves a diffusers-named file.
    sgm_model = torch.nn.Module()
    layer = torch.nn.Linear(8, 8)
    sgm_model.add_module(
        "input_blocks", torch.nn.ModuleDict({"4": torch.nn.ModuleDict({"1": torch.nn.ModuleDict({"proj_in": layer})})})
    )
    index = sgm_layer_index(sgm_model)
    assert resolve_layers(["lora_unet_down_blocks_1_attentions_0_proj_in"], index) == {
        "lora_unet_down_blocks_1_attentions_0_proj_in": layer
    }
    with pytest.raises(TSMFileError, match="not in this model"):
        resolve_layers(["lora_unet_nowhere"], index)


def test_switcher_rejects_a_file_whose_shapes_do_not_fit(foster_file):
    tensors, meta = load_file(foster_file)
    other = tiny_unet(cross_attention_dim=24)
    names = sorted({k.split(".", 1)[0] for k in tensors})
    with pytest.raises(TSMFileError, match="attn2_to_k.*does not fit the layer's weight"):
        ExpertSwitcher(tensors, meta, resolve_layers(names, layers_by_lora_name(other), foster_file))


# ---------------------------------------------------------------------------------------------
# the sampling-time session policy shared by the adapters (tsm_trainer.runtime.sampling_session)
# ---------------------------------------------------------------------------------------------
from torch.overrides import TorchFunctionMode  # noqa: E402

from tsm_trainer.core.torch_compat import autocast_enabled  # noqa: E402
from tsm_trainer.runtime.online import cpu_timesteps  # noqa: E402
from tsm_trainer.runtime.sampling_session import (  # noqa: E402
    SamplingSession,
    SessionFile,
    TSMSamplingError,
    choose_path,
    weights_writable,
)


def _session_file(path, unet, **kw):
    tensors, meta = load_file(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te")}
    names = sorted({k.split(".", 1)[0] for k in tensors})
    return SessionFile(tensors, meta, resolve_layers(names, layers_by_lora_name(unet), path), path=path, **kw)


def test_policy_merges_only_a_fostered_file_on_writable_weights_once(foster_file, tmp_path):
    unet = tiny_unet()
    f = _session_file(foster_file, unet)
    assert choose_path(f.metadata, f.layers, path=f.path) == (True, "")
    assert choose_path(f.metadata, f.layers, merge_taken=True)[0] is False
    assert choose_path(f.metadata, f.layers, mode="online") == (False, "mode=online")
    fp8 = {"x": torch.nn.Linear(2, 2).to(torch.float8_e4m3fn)}
    assert not weights_writable(fp8["x"])
    assert choose_path(f.metadata, fp8)[1].startswith("quantized weights")
    with pytest.raises(TSMFileError, match="mode=merge is impossible: quantized weights"):
        choose_path(f.metadata, fp8, mode="merge", path="f.safetensors")
    a = _session_file(write_assembled_file(tmp_path, "a.safetensors"), unet)
    with pytest.raises(TSMFileError, match="mode=merge is impossible: an assembled file"):
        choose_path(a.metadata, a.layers, mode="merge")
    with pytest.raises(TSMFileError, match="mode='fast'"):
        choose_path(f.metadata, f.layers, mode="fast")
    session = SamplingSession([f, _session_file(foster_file, unet, multiplier=0.5)])
    assert [r.merge for r in session] == [True, False]
    assert "already merges" in session.runs[1].reason
    session.restore()


def test_mixed_interval_batch_falls_back_online_exactly_and_says_so(foster_file):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    session = SamplingSession([_session_file(foster_file, unet)])
    x, c = _inputs()
    session.set_timestep(torch.tensor([990.0, 990.0]), 2)
    assert session.runs[0].merge and not session.notices
    session.set_timestep(torch.tensor([10.0, 990.0]), 2)  # two experts in one call
    assert not session.runs[0].merge and "different experts" in session.notices[0]
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 990]), c).sample
    torch.testing.assert_close(out[:1], _reference(foster_file, 10)[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1:], _reference(foster_file, 990)[1:], rtol=1e-4, atol=1e-5)
    session.restore()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


def test_an_error_mid_merge_restores_every_weight_then_raises_and_closes(foster_file):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    session = SamplingSession([_session_file(foster_file, unet)])
    session.set_timestep(990.0)
    switcher = session.runs[0].runtime
    calls = []

    def delta_then_oom(name, e, _orig=switcher._expert_delta):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return _orig(name, e)

    switcher._expert_delta = delta_then_oom  # fails after 2 layers of the next expert were written
    with pytest.raises(
        TSMSamplingError,
        match=r"f8.safetensors: RuntimeError: CUDA out of memory "
        r"\(at t=\[10.0\]; the base weights were restored",
    ):
        session.set_timestep(10.0)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(TSMSamplingError, match="stopped by an earlier error"):
        session.set_timestep(10.0)
    session.restore()  # idempotent


def test_restore_tries_every_file_and_reraises_the_first_failure(foster_file, tmp_path):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    session = SamplingSession(
        [_session_file(write_assembled_file(tmp_path, "a.safetensors"), unet), _session_file(foster_file, unet)]
    )
    session.set_timestep(500.0, 1)
    session.runs[0].runtime.restore = lambda: (_ for _ in ()).throw(OSError("boom"))
    with pytest.raises(OSError, match="boom"):
        session.restore()
    assert session.runs[1].restored  # the merged file was still put back
    merged = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert not merged


class _OnMPS(torch.Tensor):
    """Marks a CPU tensor as living on an MPS device (subclasses propagate through ops)."""


class _MPSRules(TorchFunctionMode):
    """MPS's float64 refusal on tensors marked :class:`_OnMPS` (``TypeError: Cannot convert a MPS
    Tensor to float64 dtype as the MPS framework doesn't support float64. Please use float32
    instead.``); ``.cpu()`` leaves the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_mps = any(isinstance(a, _OnMPS) for a in args)
        if on_mps and func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        wants64 = kwargs.get("dtype") is torch.float64 or torch.float64 in args[1:] or func is torch.Tensor.double
        if on_mps and wants64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return func(*args, **kwargs)


def test_timesteps_leave_the_device_before_the_float64_cast(foster_file):
    t = torch.tensor([999.0, 999.0]).as_subclass(_OnMPS)
    unet = tiny_unet()
    session = SamplingSession([_session_file(foster_file, unet)])
    with _MPSRules():
        with pytest.raises(TypeError, match="MPS"):
            torch.as_tensor(t, dtype=torch.float64)  # what ExpertSwitcher.expert_for did before
        assert cpu_timesteps(t).dtype == torch.float64
        assert session.runs[0].runtime.expert_for(t) == 7
        session.set_timestep(t, 2)
    assert session.runs[0].active == 7
    session.restore()


def test_autocast_query_works_without_the_device_argument(monkeypatch):
    assert autocast_enabled("cpu") is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu") is True

    def old_api(*args):  # torch < 2.4: is_autocast_enabled() takes no argument and means CUDA
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return True

    monkeypatch.setattr(torch, "is_autocast_enabled", old_api)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: False, raising=False)
    assert autocast_enabled("cuda") is True and autocast_enabled("cpu") is False and autocast_enabled("mps") is False


def test_weights_the_host_rewrote_mid_run_are_rebased_not_overwritten(foster_file):
    """ComfyUI's unpatch_model/partially_unload put their own backups back (copy_to_param in place, or
    set_attr_param with a new Parameter) while the expert is merged: restoring ours afterwards would
    re-apply the host's patches under its feet. Those weights keep the host's value; a new Parameter is
    re-merged at the next call."""
    unet = tiny_unet()
    layers = layers_by_lora_name(unet)
    session = SamplingSession([_session_file(foster_file, unet)])
    switcher = session.runs[0].runtime
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = layers[name]
    host_patched = layer.weight.detach().clone()  # what the host had applied before sampling
    session.set_timestep(990.0)
    merged = layer.weight.detach().clone()
    assert not torch.equal(merged, host_patched)
    host_base = host_patched - 0.25  # the host unpatches in place: its own backup comes back
    with torch.no_grad():
        layer.weight.copy_(host_base)
    session.set_timestep(990.0)  # same expert; the in-place rewrite is seen at the next write
    other = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    layers[other].weight = torch.nn.Parameter(layers[other].weight.detach() * 0 + 1.0)  # set_attr_param
    session.set_timestep(990.0)
    assert not torch.equal(layers[other].weight.detach(), torch.ones_like(layers[other].weight))  # re-merged on it
    session.restore()
    assert torch.equal(layer.weight.detach(), host_base)  # not our stale backup
    assert torch.equal(layers[other].weight.detach(), torch.ones_like(layers[other].weight))
    assert switcher.rebased == [name]


def test_policy_when_the_host_merges_judges_the_file_only(foster_file, tmp_path):
    """A1111's Lora writes the weights (layers=None): storage is not ours to judge; the file kind is."""
    f = load_file(foster_file)[1]
    assert choose_path(f, None) == (True, "")
    assert choose_path(load_file(write_assembled_file(tmp_path, "a.safetensors"))[1], None) == (
        False,
        "an assembled file (routers) runs online",
    )
    with pytest.raises(TSMFileError, match="ExpertSwitcher takes fostered files"):
        ExpertSwitcher(*load_file(write_assembled_file(tmp_path, "b.safetensors")), {}, path="b.safetensors")


def test_online_names_a_module_without_down_weight(foster_file):
    """It used to stop with a bare StopIteration."""
    f = _session_file(foster_file, tiny_unet())
    tensors = {**f.tensors, "lora_unet_extra.alpha": torch.tensor(4.0)}
    with pytest.raises(TSMFileError, match=r"f8.safetensors: module lora_unet_extra has no lora_down weight"):
        OnlineTSM(tensors, f.metadata, {**f.layers, "lora_unet_extra": torch.nn.Linear(2, 2)}, path=f.path)
