"""Exports for plain LoRA loaders (docs/design.md section 5), checked against diffusers itself."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.base_models.loading import load_components
from tsm_trainer.core.file_format import load_file, tensor_data_sha256
from tsm_trainer.core.intervals import interval_timestep_range
from tsm_trainer.core.lora_math import lora_delta, module_names
from tsm_trainer.core.targets import lora_name_index
from tsm_trainer.files.export import (
    expert_lora,
    fold_alpha,
    kohya_to_peft,
    merge_experts,
    merge_weights,
    peft_to_kohya,
    svd_truncate,
    write_expert_files,
)


def _pipe(folder):
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def tsm_file(tiny_sd_base, tmp_path_factory):
    pipe = _pipe(tiny_sd_base)
    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0), pipe.unet, [pipe.text_encoder])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = str(tmp_path_factory.mktemp("tsm") / "style.safetensors")
    net.save(path, metadata={"modelspec.title": "style", "ss_output_name": "style"})
    return path


def _unet_out(unet, t):
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([t, t]), c).sample


def _tsm_out(tiny_sd_base, tsm_file, t):
    pipe = _pipe(tiny_sd_base)
    net = TSMNetwork.from_file(tsm_file, pipe.unet, [pipe.text_encoder])
    net.apply()
    net.attach(pipe.unet)
    ids = torch.tensor([[0, 5, 9, 13, 1]])
    with torch.no_grad():
        return _unet_out(pipe.unet, t), pipe.text_encoder(ids)[0]


def _lora_layers(model):
    return sum(1 for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)


@pytest.mark.parametrize("fold", [True, False])
def test_each_exported_expert_loads_in_diffusers_and_matches_its_interval(tiny_sd_base, tsm_file, tmp_path, fold):
    written = write_expert_files(tsm_file, str(tmp_path), fold=fold)
    experts = [w for w in written if w["kind"] == "expert"]
    assert len(experts) == 8 and sum(w["kind"] == "text_encoder" for w in written) == 1
    names = {load_file(w["path"])[1]["ss_output_name"] for w in experts}
    assert len(names) == 8
    for w in experts[::3]:
        tensors, meta = load_file(w["path"])
        assert meta["modelspec.timestep_range"] == "{},{}".format(*interval_timestep_range(w["e"], 8))
        assert meta["tsm.expert"] == f"{w['e']}/8" and meta["sshs_model_hash"] == tensor_data_sha256(w["path"])
        assert not any(".tsm." in k or k.startswith("lora_te") for k in tensors)  # no mixed files
        pipe = _pipe(tiny_sd_base)
        pipe.load_lora_weights(w["path"])
        assert _lora_layers(pipe.unet) == len(module_names(tensors))  # nothing skipped
        t = (w["lo"] + w["hi"] - 1) // 2
        torch.testing.assert_close(
            _unet_out(pipe.unet, t), _tsm_out(tiny_sd_base, tsm_file, t)[0], rtol=1e-5, atol=1e-5
        )

    # diffusers 0.42 cannot read a kohya text-encoder LoRA without out_proj (it takes it for
    # its old format): the static file is checked through the PEFT conversion below.
    te_file = next(w["path"] for w in written if w["kind"] == "text_encoder")
    te_tensors, te_meta = load_file(te_file)
    assert te_tensors and all(k.startswith("lora_te_") for k in te_tensors) and "tsm.expert" not in te_meta


def test_fold_alpha_keeps_the_delta(tsm_file):
    tensors, _ = load_file(tsm_file)
    lora = expert_lora(tensors, 8, 5)
    folded = fold_alpha(lora)
    for name in module_names(lora):
        assert float(folded[f"{name}.alpha"]) == lora[f"{name}.lora_down.weight"].shape[0]
        torch.testing.assert_close(lora_delta(folded, name), lora_delta(lora, name))


def test_exact_merge_is_the_weighted_sum_of_deltas(tsm_file):
    tensors, _ = load_file(tsm_file)
    weights = merge_weights(8, list(range(8)), [0.5, 0.1, 0.1, 0.05, 0.05, 0.1, 0.05, 0.05])
    merged = merge_experts(tensors, 8, weights)
    for name in module_names(expert_lora(tensors, 8, 0)):
        expected = sum(w * lora_delta(expert_lora(tensors, 8, e), name) for e, w in enumerate(weights))
        assert merged[f"{name}.lora_down.weight"].shape[0] == 8 * 2
        torch.testing.assert_close(lora_delta(merged, name), expected, rtol=1e-5, atol=1e-6)
    assert merge_weights(8, [0, 1], "uniform") == [0.5, 0.5]
    assert merge_weights(3, [0, 1, 2], "interval") == [334 / 1000, 333 / 1000, 333 / 1000]
    with pytest.raises(ValueError, match="2 weights given for 3 experts"):
        merge_weights(8, [0, 1, 2], [0.5, 0.5])


def test_svd_error_falls_as_rank_rises(tsm_file):
    tensors, _ = load_file(tsm_file)
    merged = merge_experts(tensors, 8, merge_weights(8, list(range(8)), "uniform"))
    errors = [svd_truncate(merged, r)[1] for r in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5  # rank 16 = the full rank of the merge
    truncated, err = svd_truncate(merged, 4)
    name = next(n for n in module_names(merged) if n.startswith("lora_unet"))
    d, d4 = lora_delta(merged, name), lora_delta(truncated, name)
    s = torch.linalg.svdvals(d.flatten(1))
    torch.testing.assert_close((d - d4).norm(), s[4:].norm(), rtol=1e-4, atol=1e-6)  # Eckart-Young optimum


def test_peft_conversion_round_trips_and_loads_in_diffusers(tiny_sd_base, tsm_file, tmp_path):
    tensors, _ = load_file(tsm_file)
    lora = {**expert_lora(tensors, 8, 2), **{k: v for k, v in tensors.items() if k.startswith("lora_te")}}
    denoiser_name, denoiser, encoders = load_components(tiny_sd_base)  # meta device: names only
    assert next(denoiser.parameters()).device.type == "meta"
    index = lora_name_index(denoiser, [m for _, m in encoders])
    components = [denoiser_name] + [c for c, _ in encoders]
    peft = kohya_to_peft(lora, index, components)
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in peft)
    back = peft_to_kohya(peft, index, components)
    for name in module_names(lora):
        torch.testing.assert_close(lora_delta(back, name), lora_delta(lora, name))

    path = str(tmp_path / "peft.safetensors")
    save_file(peft, path)
    pipe = _pipe(tiny_sd_base)
    pipe.load_lora_weights(path)
    assert _lora_layers(pipe.unet) + _lora_layers(pipe.text_encoder) == len(module_names(lora))
    lo, hi = interval_timestep_range(2, 8)
    unet_ref, te_ref = _tsm_out(tiny_sd_base, tsm_file, lo)
    torch.testing.assert_close(_unet_out(pipe.unet, lo), unet_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(torch.tensor([[0, 5, 9, 13, 1]]))[0], te_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lora_unet_nowhere"):
        kohya_to_peft(
            {
                "lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1),
            },
            index,
            components,
        )
