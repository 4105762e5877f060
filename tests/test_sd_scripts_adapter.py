"""networks.tsm_lora driven exactly as sd-scripts' train_network.py / gen_img.py drive it."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

import networks.tsm_lora as tsm_lora
from tests.tiny_models import tiny_clip, tiny_unet
from tsm_trainer.core.file_format import TSMFileError, load_file


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    ids = torch.randint(0, 100, (n, 6), generator=g)
    return latents, ids


def _eval_loss(unet, te, sched, latents, ids):
    g = torch.Generator().manual_seed(42)
    t = torch.arange(len(latents)) * (1000 // len(latents)) + 7  # every interval of n=8
    noise = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        enc = te(ids)[0]
        pred = unet(sched.add_noise(latents, noise, t), t, enc).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_train_network_call_order_trains_saves_and_reloads(tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000)
    latents, ids = _batch()

    # train_network.py: net_kwargs are raw strings, plus dropout added as float/None.
    net_kwargs = {"tsm_scales": "8", "dropout": None}
    network = tsm_lora.create_network(1.0, 4, 4, None, te, unet, neuron_dropout=None, **net_kwargs)
    network.apply_to(te, unet, True, True)
    results = network.prepare_optimizer_params(1e-2, 5e-2, 5e-2)
    assert type(results) is list  # pre-v0.9 convention, accepted by later versions too
    optimizer = torch.optim.AdamW(results, weight_decay=1e-2)
    network.prepare_grad_etc(te, unet)
    before = _eval_loss(unet, te, sched, latents, ids)
    g = torch.Generator().manual_seed(42)  # the evaluation draw: the loop overfits it
    t = torch.arange(len(latents)) * (1000 // len(latents)) + 7
    noise = torch.randn(latents.shape, generator=g)
    for _epoch in range(2):
        network.on_epoch_start(te, unet)
        for _step in range(15):
            network.on_step_start(te, unet)
            enc = te(ids)[0]
            pred = unet(sched.add_noise(latents, noise, t), t, enc).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    network.eval()
    after = _eval_loss(unet, te, sched, latents, ids)
    assert after < 0.9 * before, (before, after)

    path = str(tmp_path / "tsm.safetensors")
    network.save_weights(path, torch.float32, {"ss_output_name": "tsm", "ss_network_dim": "4"})
    tensors, meta = load_file(path)
    assert meta["ss_network_module"] == "networks.tsm_lora"
    assert json.loads(meta["ss_network_args"]) == {"tsm_scales": "8", "dropout": "None"}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_v2"] == "False"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["ss_base_model_version"] == "sd_v1"
    assert sum(k.endswith("lora_down.weight") and ".tsm.8." in k for k in tensors) == 8 * len(network.denoiser_loras)

    # gen_img.py: create_network_from_weights(for_inference=True), apply_to with 2 args, load_state_dict.
    unet2, te2 = tiny_unet(), tiny_clip()
    net2, weights_sd = tsm_lora.create_network_from_weights(1.0, path, None, te2, unet2, for_inference=True)
    net2.apply_to(te2, unet2)
    net2.load_state_dict(weights_sd, False)
    net2.eval()
    assert _eval_loss(unet2, te2, sched, latents, ids) == pytest.approx(after, rel=1e-6)
    assert net2.is_mergeable() is False


def test_optimizer_param_conventions():
    unet, te = tiny_unet(), tiny_clip()
    network = tsm_lora.create_network(1.0, 2, 1, None, [te], unet, tsm_scales="4")
    two = network.prepare_optimizer_params(1e-4, 1e-3)  # the 2-argument form of old sd-scripts
    assert [g["lr"] for g in two] == [1e-4, 1e-3]
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([5e-5], None, 1e-3)
    assert descriptions == ["textencoder", "unet experts"] and [g["lr"] for g in groups] == [5e-5, 1e-3]
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in network.get_trainable_params())
    groups = network.prepare_optimizer_params(0, 1e-3, 1e-3)  # text_encoder_lr 0: that part not trained
    assert len(groups) == 1


def test_network_args_are_strict():
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"(?s)unknown network_args key 'tsm_scale'.*Valid keys:.*tsm_scales"):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_scale="8")
    with pytest.raises(ValueError, match=r"network_args tsm_scales='eight'"):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_scales="eight")
    with pytest.raises(ValueError, match=r"network_args tsm_stage='assembly': expected one of"):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_stage="assembly")
    with pytest.raises(ValueError, match="tsm_stage=foster trains one scale at a time"):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_scales="8,1")
    with pytest.raises(ValueError, match="needs tsm_experts"):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_scales="8,1", tsm_stage="assemble")
    with pytest.raises(ValueError, match="tsm_interval=8 is not an expert of scale 8"):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_scales="8", tsm_interval="8")


def _foster(tmp_path, scales, unet, te, seed):
    net = tsm_lora.create_network(1.0, 2, 2, None, te, unet, tsm_scales=scales)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = str(tmp_path / f"foster{scales}.safetensors")
    net.save_weights(path, None, None)
    return net, path


def test_assemble_from_fostered_files(tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    net8, f8 = _foster(tmp_path, "8", unet, te, 1)
    net1, f1 = _foster(tmp_path, "1", unet, te, 2)
    network = tsm_lora.create_network(
        1.0, 2, 2, None, te, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts=f"{f8},{f1}"
    )
    state = network.state_dict()
    for k, v in net8.state_dict().items():
        assert torch.equal(state[k], v), k  # core scale file: experts and text-encoder LoRA
    for k, v in net1.state_dict().items():
        if ".tsm." in k:
            assert torch.equal(state[k], v), k
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)

    x, c = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    t = torch.tensor([5, 500, 990])
    network.apply_to(te, unet)
    network.prepare_grad_etc(te, unet)
    with torch.no_grad():
        assembled = unet(x, t, c).sample
    network.remove()
    net8.apply_to(te, unet)
    with torch.no_grad():
        core_only = unet(x, t, c).sample
    torch.testing.assert_close(assembled, core_only, rtol=1e-5, atol=1e-6)

    path = str(tmp_path / "assembled.safetensors")
    network.save_weights(path, None, None)
    _, meta = load_file(path)
    assert meta["tsm.stage"] == "assemble" and json.loads(meta["tsm.scales"]) == [8, 1]
    unet2 = tiny_unet()
    net2, sd = tsm_lora.create_network_from_weights(1.0, path, None, tiny_clip(), unet2)
    net2.load_weights(path)
    assert net2.config.mixture == "asymmetric" and net2.denoiser_loras[0].router is not None

    with pytest.raises(TSMFileError, match="scale 4, which is not in tsm_scales"):
        _, f4 = _foster(tmp_path, "4", unet, te, 3)
        tsm_lora.create_network(
            1.0, 2, 2, None, te, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts=f"{f8},{f4}"
        )
    with pytest.raises(TSMFileError, match="missing key"):
        tsm_lora.create_network(1.0, 2, 2, None, te, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts=f8)


def test_single_interval_training(tmp_path):
    unet = tiny_unet()
    network = tsm_lora.create_network(1.0, 2, 2, None, None, unet, tsm_scales="8", tsm_interval="2")
    network.apply_to(None, unet, False, True)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    unet(x, torch.tensor([250, 374]), c)  # inside [250, 375)
    with pytest.raises(ValueError, match=r"--min_timestep 250 --max_timestep 375"):
        unet(x, torch.tensor([250, 375]), c)
    path = str(tmp_path / "i2.safetensors")
    network.save_weights(path, None, None)
    tensors, meta = load_file(path)
    assert meta["tsm.interval"] == "2"
    assert {k.split(".tsm.8.")[1].split(".")[0] for k in tensors if ".tsm." in k} == {"2"}
    net2, _ = tsm_lora.create_network_from_weights(1.0, path, None, None, tiny_unet())
    net2.load_weights(path)


def test_static_network_merges_and_restores():
    unet = tiny_unet()
    w0 = {k: v.clone() for k, v in unet.state_dict().items()}
    network = tsm_lora.create_network(1.0, 2, 2, None, None, unet, tsm_scales="1")
    with torch.no_grad():
        for _n, p in network.named_parameters():
            p.add_(0.3)
    network.apply_to(None, unet)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([3, 800])
    with torch.no_grad():
        applied = unet(x, t, c).sample
        assert network.is_mergeable()
        network.pre_calculation()
        torch.testing.assert_close(unet(x, t, c).sample, applied, rtol=1e-4, atol=1e-5)
    network.restore_weights()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in w0.items())

    multi = tsm_lora.create_network(1.0, 2, 2, None, None, tiny_unet(), tsm_scales="8")
    with pytest.raises(ValueError, match="8 experts per module .* cannot be merged"):
        multi.merge_to(None, None, None)


def test_max_norm_regularization():
    network = tsm_lora.create_network(1.0, 2, 2, None, tiny_clip(), tiny_unet(), tsm_scales="4")
    with torch.no_grad():
        for _n, p in network.named_parameters():
            p.copy_(torch.randn(p.shape) * 3)
    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(0.5, "cpu")
    assert keys_scaled > 0 and max_norm <= 0.5 + 1e-5 and 0 < mean_norm <= max_norm
    lora = network.denoiser_loras[0]
    pair = lora.expert(4, 3)
    norm = (lora.pair_delta(pair.lora_down.weight, pair.lora_up.weight) * lora.scale).norm()
    assert norm <= 0.5 + 1e-5


def test_network_args_and_sizes_are_checked_first():
    unet = tiny_unet()
    with pytest.raises(
        ValueError, match=r"unknown network_args key 'tsm_scale' for networks.tsm_lora \(did you mean 'tsm_scales'\?\)"
    ):
        tsm_lora.create_network(1.0, 4, 4, None, None, unet, tsm_scale="8")
    with pytest.raises(ValueError, match=r"--network_dim 0: the LoRA rank must be >= 1"):
        tsm_lora.create_network(1.0, 0, 4, None, None, unet, tsm_scales="8")
    with pytest.raises(ValueError, match=r"--network_alpha nan: must be a finite number"):
        tsm_lora.create_network(1.0, 4, float("nan"), None, None, unet, tsm_scales="8")
    with pytest.raises(TSMFileError, match=r"missing.safetensors: no such file"):
        tsm_lora.create_network(
            1.0, 4, 4, None, None, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts="missing.safetensors"
        )


def test_prepare_network_refuses_ckpt_and_records_the_resolution(tmp_path):
    """sd-scripts (train_network.py, right after create_network) calls network.prepare_network(args)."""
    from argparse import Namespace

    unet = tiny_unet()
    net = tsm_lora.create_network(1.0, 2, 2, None, None, unet, tsm_scales="8")
    for fmt in ("ckpt", "pt"):
        with pytest.raises(ValueError, match=rf"--save_model_as {fmt}: TSM networks are saved as .safetensors only"):
            net.prepare_network(Namespace(save_model_as=fmt, resolution=(64, 64)))
    net.prepare_network(Namespace(save_model_as="safetensors", resolution=(64, 48)))
    path = str(tmp_path / "r.safetensors")
    net.save_weights(path, None, {})
    assert load_file(path)[1]["modelspec.resolution"] == "64x48"
    net.save_weights(path, None, {"modelspec.resolution": "512x512"})  # sd-scripts' guess without --resolution
    assert load_file(path)[1]["modelspec.resolution"] == "64x48"
    other = tsm_lora.create_network(1.0, 2, 2, None, None, unet, tsm_scales="8")
    other.save_weights(
        path,
        None,
        {
            "modelspec.resolution": "512x512",
            "ss_datasets": json.dumps([{"resolution": [32, 32]}, {"resolution": [64, 64]}]),
        },
    )
    assert load_file(path)[1]["modelspec.resolution"] == "64x64"  # from sd-scripts' dataset metadata


def test_assemble_after_a_unet_only_stage_1(tmp_path):
    """--network_train_unet_only at stage 1: apply_to(..., apply_text_encoder=False) drops the TE LoRA."""
    unet, te = tiny_unet(), tiny_clip()
    paths = []
    for scales, seed in (("8", 1), ("1", 2)):
        net = tsm_lora.create_network(1.0, 2, 2, None, te, unet, tsm_scales=scales)
        net.apply_to(te, unet, False, True)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        paths.append(str(tmp_path / f"u{scales}.safetensors"))
        net.save_weights(paths[-1], None, None)
        net.remove()
    network = tsm_lora.create_network(
        1.0, 2, 2, None, te, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts=",".join(paths)
    )
    assert network.text_encoder_loras == []
    network.apply_to(te, unet, True, True)  # stage 2 without the flag
    out = str(tmp_path / "a.safetensors")
    network.save_weights(out, None, None)
    tensors, _ = load_file(out)
    assert not any(k.startswith("lora_te") for k in tensors) and any(".router." in k for k in tensors)
    tsm_lora.create_network_from_weights(1.0, out, None, tiny_clip(), tiny_unet())[0].load_weights(out)


def test_unet_only_assemble_carries_the_fostered_text_encoder_lora(tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    net8, f8 = _foster(tmp_path, "8", unet, te, 1)
    _, f1 = _foster(tmp_path, "1", unet, te, 2)
    network = tsm_lora.create_network(
        1.0, 2, 2, None, te, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts=f"{f8},{f1}"
    )
    network.apply_to(te, unet, False, True)  # --network_train_unet_only at stage 2
    network.prepare_grad_etc(te, unet)
    assert network.text_encoder_loras and not any(
        p.requires_grad for lo in network.text_encoder_loras for p in lo.parameters()
    )
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        carried = te(ids)[0]
    network.remove()
    net8.apply_to(te, unet)
    with torch.no_grad():
        torch.testing.assert_close(te(ids)[0], carried, rtol=0, atol=0)  # the TE LoRA is applied, as fostered
    net8.remove()
    out = str(tmp_path / "a.safetensors")
    network.save_weights(out, None, None)
    tensors, _ = load_file(out)
    te_keys = [k for k in net8.state_dict() if k.startswith("lora_te")]
    assert te_keys and all(torch.equal(tensors[k], net8.state_dict()[k]) for k in te_keys)


def test_forged_scales_are_refused_before_anything_is_built(tmp_path):
    from safetensors.torch import save_file

    unet = tiny_unet()
    _, path = _foster(tmp_path, "8", unet, None, 1)
    tensors, meta = load_file(path)
    forged = str(tmp_path / "forged.safetensors")
    save_file(tensors, forged, {**meta, "tsm.scales": "[1000000]"})
    with pytest.raises(
        TSMFileError,
        match=r"forged.safetensors: tsm.scales=\[1000000\]: every scale must be in "
        r"1..tsm.num_train_timesteps=1000",
    ):
        tsm_lora.create_network_from_weights(1.0, forged, None, None, tiny_unet())
    save_file(tensors, forged, {**meta, "tsm.scales": "[999]"})
    with pytest.raises(
        TSMFileError,
        match=r"forged.safetensors: keys '.tsm.8.\*' belong to scale 8, which is not in "
        r"tsm.scales=\[999\]",
    ):
        tsm_lora.create_network_from_weights(1.0, forged, None, None, tiny_unet())
    save_file({k: v for k, v in tensors.items() if ".tsm.8.7." not in k}, forged, meta)
    with pytest.raises(
        TSMFileError,
        match=r"forged.safetensors: tsm.scales says scale 8 has 8 experts, the keys "
        r"hold 7 \(1 missing\)",
    ):
        tsm_lora.create_network_from_weights(1.0, forged, None, None, tiny_unet())


def test_saved_files_get_the_umask_mode(tmp_path):
    import os

    net = tsm_lora.create_network(1.0, 2, 2, None, None, tiny_unet(), tsm_scales="8")
    old = os.umask(0o022)
    try:
        net.save_weights(str(tmp_path / "a.safetensors"), None, None)
        os.umask(0o077)
        net.save_weights(str(tmp_path / "b.safetensors"), None, None)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b.safetensors").st_mode & 0o777 == 0o600


def test_pre_flight_check_of_network_options(capsys):
    assert tsm_lora.main(["--network_dim", "4", "--network_alpha", "4", "--network_args", "tsm_scales=8"]) == 0
    assert "ok: stage foster, scales [8], rank 4, alpha 4.0" in capsys.readouterr().out
    assert tsm_lora.main(["--network_args", "tsm_scale=8"]) == 2
    assert "did you mean 'tsm_scales'?" in capsys.readouterr().err
    assert (
        tsm_lora.main(["--network_args", "tsm_scales=8,1", "tsm_stage=assemble", "tsm_experts=nowhere.safetensors"])
        == 2
    )
    assert "nowhere.safetensors: no such file" in capsys.readouterr().err
