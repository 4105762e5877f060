"""The native file: round trip, hashes, atomic writes and errors that name key and file."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.tiny_models import tiny_clip, tiny_unet
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.core.file_format import TSMFileError, load_file, sshs_hashes, tensor_data_sha256


def _trained_net(unet, te=None, **cfg):
    net = TSMNetwork(TSMConfig(**{"scales": [8], "rank": 2, "alpha": 1.0, **cfg}), unet, [te] if te else [])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _out(unet, t=(10, 600, 999)):
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(len(t), 4, 8, 8, generator=g), torch.randn(len(t), 5, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(t), c).sample


def test_round_trip_reproduces_outputs(tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    net = _trained_net(unet, te)
    net.apply()
    net.attach(unet)
    expected = _out(unet)
    path = str(tmp_path / "tsm.safetensors")
    meta = net.save(path, metadata={"ss_output_name": "tsm"})
    assert json.loads(meta["tsm.scales"]) == [8] and meta["tsm.stage"] == "foster"
    net.remove()

    unet2, te2 = tiny_unet(), tiny_clip()
    loaded = TSMNetwork.from_file(path, unet2, [te2])
    loaded.apply()
    loaded.attach(unet2)
    torch.testing.assert_close(_out(unet2), expected, rtol=0, atol=0)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_keys_and_metadata_follow_the_design(tmp_path):
    net = _trained_net(tiny_unet(), tiny_clip())
    path = str(tmp_path / "a.safetensors")
    net.save(path, metadata={"ss_network_module": "networks.tsm_lora"})
    tensors, meta = load_file(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.tsm.8.7.lora_down.weight"].shape == (2, 8)
    assert tensors[f"{key}.tsm.8.7.lora_up.weight"].shape == (8, 2)
    assert tensors[f"{key}.alpha"].shape == ()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert meta["tsm.format_version"] == "1" and meta["tsm.num_train_timesteps"] == "1000"
    assert meta["tsm.timestep_space"] == "ddpm" and meta["tsm.mixture"] == "asymmetric"
    # sd-scripts' sshs_model_hash: sha256 of the tensor-data section (independent of metadata).
    assert meta["sshs_model_hash"] == tensor_data_sha256(path)
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []  # atomic: no temp file left


def test_legacy_hash_reads_one_mib_in():
    big = {"w": torch.arange(600_000, dtype=torch.float32)}  # 2.4 MB: the 64 KiB window is inside
    _, legacy = sshs_hashes(big, {"ss_x": "1", "other": "ignored"})
    _, legacy_same = sshs_hashes(big, {"ss_x": "1"})
    assert legacy == legacy_same  # only ss_* metadata enters the hash, as in sd-scripts
    from safetensors.torch import save

    data = save(big, {"ss_x": "1"})
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_truncated_file_is_named(tmp_path):
    path = str(tmp_path / "t.safetensors")
    _trained_net(tiny_unet()).save(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(TSMFileError, match="t.safetensors: not a readable safetensors file"):
        TSMNetwork.from_file(path, tiny_unet())


def test_pickle_files_are_never_loaded(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(TSMFileError, match="only .safetensors"):
        TSMNetwork.from_file(path, tiny_unet())


def test_file_for_another_base_model_is_rejected(tmp_path):
    path = str(tmp_path / "sd2.safetensors")
    _trained_net(tiny_unet(cross_attention_dim=24)).save(path)
    with pytest.raises(TSMFileError, match=r"sd2.safetensors: does not fit this model: key '.*attn2_to_k.*' has shape"):
        TSMNetwork.from_file(path, tiny_unet(cross_attention_dim=16))
    other = tiny_unet(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(TSMFileError, match="not in this model"):
        TSMNetwork.from_file(path, other)


def test_missing_extra_key_and_metadata_errors_name_them(tmp_path):
    net = _trained_net(tiny_unet())
    path = str(tmp_path / "k.safetensors")
    net.save(path)
    tensors, meta = load_file(path)
    key = next(k for k in tensors if k.endswith("tsm.8.3.lora_up.weight"))

    alpha = key.split(".")[0] + ".alpha"
    missing = dict(tensors)
    del missing[alpha]
    save_file(missing, str(tmp_path / "m.safetensors"), meta)
    with pytest.raises(
        TSMFileError, match=r"m.safetensors: does not fit this model: 1 missing key\(s\), e.g. \['" + alpha
    ):
        net.load_weights(str(tmp_path / "m.safetensors"))

    half = dict(tensors)
    del half[key]
    save_file(half, str(tmp_path / "h.safetensors"), meta)
    with pytest.raises(
        TSMFileError, match=r"h.safetensors: key '.*tsm\.8\.3\.lora_down.weight' has no matching '" + key
    ):
        net.load_weights(str(tmp_path / "h.safetensors"))

    extra = dict(tensors)
    extra[key.replace("tsm.8.3", "tsm.8.9")] = tensors[key].clone()
    extra[key.replace("tsm.8.3", "tsm.8.9").replace("lora_up", "lora_down")] = tensors[
        key.replace("lora_up", "lora_down")
    ].clone()
    save_file(extra, str(tmp_path / "e.safetensors"), meta)
    with pytest.raises(TSMFileError, match=r"e.safetensors: does not fit this model: 2 unknown key.*tsm\.8\.9"):
        net.load_weights(str(tmp_path / "e.safetensors"))

    save_file(tensors, str(tmp_path / "v.safetensors"), {**meta, "tsm.format_version": "9"})
    with pytest.raises(TSMFileError, match="v.safetensors: tsm.format_version '9' is not supported"):
        net.load_weights(str(tmp_path / "v.safetensors"))

    save_file(tensors, str(tmp_path / "s.safetensors"), {**meta, "tsm.scales": "[4]"})
    with pytest.raises(TSMFileError, match=r"s.safetensors: tsm.scales is \[4\] but this network has \[8\]"):
        net.load_weights(str(tmp_path / "s.safetensors"))

    save_file(tensors, str(tmp_path / "p.safetensors"), {})
    with pytest.raises(TSMFileError, match="p.safetensors: no 'tsm.format_version' metadata"):
        net.load_weights(str(tmp_path / "p.safetensors"))


def test_dtype_on_save(tmp_path):
    path = str(tmp_path / "h.safetensors")
    _trained_net(tiny_unet()).save(path, dtype=torch.float16)
    with safe_open(path, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
