"""ComfyUI workflow export: schedule math against a model of ComfyUI's code, graph consistency.

The model of ComfyUI below reimplements, in torch float32 as ComfyUI runs them:
- comfy/model_sampling.py ``ModelSamplingDiscrete``: ``_register_schedule`` (sigma table from
  ``make_beta_schedule`` in comfy/ldm/modules/diffusionmodules/util.py), ``sigma(t)`` (linear
  interpolation of log_sigmas), ``timestep(sigma)`` (argmin over |log sigma - log_sigmas|: the
  integer t the UNet receives) and ``percent_to_sigma(p)`` (999999999.9 for p <= 0, 0 for
  p >= 1, else ``sigma(torch.tensor((1 - p) * 999.0)).item()``).
- comfy/hooks.py ``HookKeyframe`` (guarantee_steps default 1), ``HookKeyframeGroup.add`` (stable
  sort by start_percent), ``reset``/``initialize_timesteps`` and ``prepare_current_keyframe``
  (advance to keyframe i while ``keyframes[i].start_t >= curr_t``, holding a keyframe for
  ``get_effective_guarantee_steps(max_sigma)`` calls: 0 if ``start_t > max(sample_sigmas)``).
- comfy_extras/nodes_hooks.py ``CreateHookKeyframe`` (one keyframe, guarantee 1) and
  ``CreateHookKeyframesInterpolated`` (percents ``torch.linspace(start, end, count)`` (float32),
  strengths by ``InterpolationMethod.get_weights``; guarantee 1 for the first, 0 for the rest).
- comfy/samplers.py ``_calc_cond_batch``: ``prepare_hook_patches_current_keyframe(timestep, ...)``
  with ``timestep`` = the sigma of the model call.
The keyframes are read from the generated workflow JSON itself, node by node.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tsm_trainer.core.intervals import expert_index, interval_timestep_range
from tsm_trainer.files.comfyui_workflow import (
    boundary_percent,
    build_workflow,
    expert_hook_schedule,
    write_workflow,
)

# ---------------------------------------------------------------------------------------------
# Core node definitions, recorded from ComfyUI's source (comfyanonymous/ComfyUI):
#   nodes.py: CheckpointLoaderSimple, LoraLoader, CLIPTextEncode, EmptyLatentImage, KSampler,
#             VAEDecode, SaveImage;
#   comfy_extras/nodes_hooks.py: CreateHookLoraModelOnly, CreateHookKeyframe,
#             CreateHookKeyframesInterpolated, SetHookKeyframes, CombineHooks2/4/8 (NodeIds of
#             CombineHooks/CombineHooksFour/CombineHooksEight), PairConditioningSetProperties.
# link inputs (name, type) in declaration order; number of widgets_values (KSampler: + the
# frontend's control_after_generate after seed); outputs (name, type).
# ---------------------------------------------------------------------------------------------
CORE_NODES = {
    "CheckpointLoaderSimple": ([], 1, [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], 3, [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP")], 1, [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], 3, [("LATENT", "LATENT")]),
    "KSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        7,
        [("LATENT", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], 0, [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], 1, []),
    "CreateHookLoraModelOnly": ([("prev_hooks", "HOOKS")], 2, [("HOOKS", "HOOKS")]),
    "CreateHookKeyframe": ([("prev_hook_kf", "HOOK_KEYFRAMES")], 2, [("HOOK_KF", "HOOK_KEYFRAMES")]),
    "CreateHookKeyframesInterpolated": ([("prev_hook_kf", "HOOK_KEYFRAMES")], 7, [("HOOK_KF", "HOOK_KEYFRAMES")]),
    "SetHookKeyframes": ([("hooks", "HOOKS"), ("hook_kf", "HOOK_KEYFRAMES")], 0, [("HOOKS", "HOOKS")]),
    "CombineHooks2": ([(f"hooks_{c}", "HOOKS") for c in "AB"], 0, [("HOOKS", "HOOKS")]),
    "CombineHooks4": ([(f"hooks_{c}", "HOOKS") for c in "ABCD"], 0, [("HOOKS", "HOOKS")]),
    "CombineHooks8": ([(f"hooks_{c}", "HOOKS") for c in "ABCDEFGH"], 0, [("HOOKS", "HOOKS")]),
    "PairConditioningSetProperties": (
        [
            ("positive_NEW", "CONDITIONING"),
            ("negative_NEW", "CONDITIONING"),
            ("mask", "MASK"),
            ("hooks", "HOOKS"),
            ("timesteps", "TIMESTEPS_RANGE"),
        ],
        2,
        [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    ),
}
REQUIRED_INPUTS = {  # inputs ComfyUI requires to be linked
    "LoraLoader": {"model", "clip"},
    "CLIPTextEncode": {"clip"},
    "VAEDecode": {"samples", "vae"},
    "KSampler": {"model", "positive", "negative", "latent_image"},
    "SaveImage": {"images"},
    "SetHookKeyframes": {"hooks"},
    "PairConditioningSetProperties": {"positive_NEW", "negative_NEW"},
}


# ---------------------------------------------------------------------------------------------
# Model of ComfyUI (see module docstring)
# ---------------------------------------------------------------------------------------------
class DiscreteSampling:
    def __init__(self, linear_start=0.00085, linear_end=0.012):
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        percent = 1.0 - percent
        return self.sigma(torch.tensor(percent * 999.0)).item()


class Keyframe:
    def __init__(self, strength, start_percent, guarantee_steps=1):
        self.strength, self.start_percent, self.guarantee_steps = strength, float(start_percent), guarantee_steps
        self.start_t = 999999999.9

    def effective_guarantee(self, max_sigma):
        return 0 if self.start_t > max_sigma else self.guarantee_steps


class KeyframeGroup:
    def __init__(self, keyframes):
        self.keyframes = []
        for kf in keyframes:  # HookKeyframeGroup.add: stable sort by start_percent
            self.keyframes.append(kf)
            self.keyframes.sort(key=lambda k: k.start_percent)

    def start(self, sampling: DiscreteSampling):
        for kf in self.keyframes:
            kf.start_t = sampling.percent_to_sigma(kf.start_percent)
        self.index, self.used, self.curr_t = 0, 0, None

    @property
    def strength(self):
        return float(self.keyframes[self.index].strength) if self.keyframes else 1.0

    def prepare(self, curr_t: float, max_sigma: float):
        if not self.keyframes or curr_t == self.curr_t:
            return
        if self.used >= self.keyframes[self.index].effective_guarantee(max_sigma):
            for i in range(self.index + 1, len(self.keyframes)):
                kf = self.keyframes[i]
                if kf.start_t >= curr_t:
                    self.index, self.used = i, 0
                    if kf.effective_guarantee(max_sigma) > 0:
                        break
                else:
                    break
        self.used += 1
        self.curr_t = curr_t


def keyframes_from_node(node_id, nodes, links) -> list[Keyframe]:
    """Evaluate a chain of keyframe nodes of the workflow as comfy_extras/nodes_hooks.py does."""
    node = nodes[node_id]
    prev_link = node["inputs"][0]["link"]
    kfs = keyframes_from_node(links[prev_link][1], nodes, links) if prev_link is not None else []
    w = node["widgets_values"]
    if node["type"] == "CreateHookKeyframe":
        return kfs + [Keyframe(w[0], w[1])]
    assert node["type"] == "CreateHookKeyframesInterpolated"
    s0, s1, method, p0, p1, count, _ = w
    assert method == "linear"
    percents = torch.linspace(p0, p1, count)  # float32, as InterpolationMethod.get_weights
    strengths = torch.linspace(s0, s1, count)
    return kfs + [Keyframe(s.item(), p.item(), 1 if i == 0 else 0) for i, (p, s) in enumerate(zip(percents, strengths))]


def expert_schedules_from_workflow(wf) -> list[tuple[str, KeyframeGroup]]:
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    out = []
    for n in wf["nodes"]:
        if n["type"] != "SetHookKeyframes":
            continue
        lora = nodes[links[n["inputs"][0]["link"]][1]]
        assert lora["type"] == "CreateHookLoraModelOnly"
        kf_src = links[n["inputs"][1]["link"]][1]
        out.append((lora["widgets_values"][0], KeyframeGroup(keyframes_from_node(kf_src, nodes, links))))
    return out


def run_sampler(sampling, groups, sigmas: torch.Tensor):
    """Per model call (every sigma but a final 0): the list of experts with nonzero strength."""
    max_sigma = sigmas.max().item()
    for _, g in groups:
        g.start(sampling)
    active = []
    for s in sigmas:
        if s.item() == 0.0:
            continue
        for _, g in groups:
            g.prepare(s, max_sigma)  # curr_t is the float32 sigma, as in ComfyUI
        active.append([name for name, g in groups if g.strength != 0.0])
    return active


def karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** rho, torch.zeros(1)])


def normal(sampling, n):
    start = sampling.timestep(sampling.sigmas[-1:]).float()[0]
    end = sampling.timestep(sampling.sigmas[:1]).float()[0]
    return torch.cat([sampling.sigma(torch.linspace(start.item(), end.item(), n)), torch.zeros(1)])


def sgm_uniform(sampling, n):
    start = sampling.timestep(sampling.sigmas[-1:]).float()[0]
    end = sampling.timestep(sampling.sigmas[:1]).float()[0]
    return torch.cat([sampling.sigma(torch.linspace(start.item(), end.item(), n + 1)[:-1]), torch.zeros(1)])


def experts_of_scale(n):
    return [(f"tsm_e{e}of{n}.safetensors",) + interval_timestep_range(e, n) for e in range(n)]


def make_workflow(experts, te="tsm_te.safetensors", sampling=None):
    return build_workflow(
        experts,
        "v1-5-pruned-emaonly.safetensors",
        te,
        "a photo of a cat",
        "blurry",
        30,
        7.0,
        42,
        512,
        512,
        0.8,
        sampling=sampling,
    )


SAMPLINGS = [DiscreteSampling(), DiscreteSampling(0.0001, 0.02)]


# ---------------------------------------------------------------------------------------------
# Schedule math
# ---------------------------------------------------------------------------------------------
def test_boundary_percent_lands_on_half_integer_timesteps():
    for k in range(1, 1000):
        p = boundary_percent(k)
        assert 0.0 < p < 1.0
        assert torch.linspace(0.0, p, 2)[1].item() == p  # float32: Interpolated's linspace keeps it
        t_p = torch.tensor((1.0 - p) * 999.0).item()  # percent_to_sigma's float32 timestep
        assert abs(t_p - (k - 0.5)) <= 1.5e-3
        sampling = SAMPLINGS[0]
        start_t = sampling.sigma(torch.tensor(t_p))
        tie = sampling.sigma(torch.tensor(k - 0.5))
        assert (tie <= start_t).item() == (sampling.timestep(tie).item() == k - 1)  # the exact tie: the UNet's side
        if (start_t > tie).item():  # no percent lands on k - 0.5: the nearest above it
            assert t_p > k - 0.5
        else:
            assert sampling.timestep(start_t).item() == k - 1  # the keyframe's own sigma is still t = k - 1


def test_schedule_shape():
    assert expert_hook_schedule(0, 1000) == [(0.0, 1.0)]
    top = expert_hook_schedule(875, 1000)
    assert top == [(0.0, 1.0), (boundary_percent(875), 0.0)]
    bottom = expert_hook_schedule(0, 125)
    assert bottom == [(0.0, 0.0), (boundary_percent(125), 1.0)]
    mid = expert_hook_schedule(375, 500)
    assert mid == [(0.0, 0.0), (boundary_percent(500), 1.0), (boundary_percent(375), 0.0)]
    assert abs(mid[1][0] - 0.5) < 1e-6  # (1 - 0.5) * 999 = 499.5, nudged by float32 ulps
    for bad in [(5, 5), (-1, 10), (10, 1001)]:
        with pytest.raises(ValueError):
            expert_hook_schedule(*bad)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("n", [1, 2, 3, 8, 10])
def test_every_integer_timestep_has_exactly_its_expert(sampling, n):
    """Stateless view: at sigma = sigmas[t] the last keyframe with start_t >= sigma is in force."""
    schedules = [(e, expert_hook_schedule(*interval_timestep_range(e, n), sampling=sampling)) for e in range(n)]
    start_ts = {e: [(sampling.percent_to_sigma(p), s) for p, s in sched] for e, sched in schedules}
    t_of = sampling.timestep(sampling.sigmas)
    for t in range(1000):
        sigma = sampling.sigmas[t].item()
        assert t_of[t].item() == t
        on = [e for e, kfs in start_ts.items() if [s for st, s in kfs if st >= sigma][-1] != 0.0]
        assert on == [expert_index(t, n)], f"t={t}"


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("n", [8, 3])
def test_sampling_runs_activate_exactly_the_expert_of_the_unet_timestep(sampling, n):
    experts = experts_of_scale(n)
    wf = make_workflow(experts, sampling=sampling)
    groups = expert_schedules_from_workflow(wf)
    assert sorted(name for name, _ in groups) == sorted(e[0] for e in experts)
    by_name = {name: (lo, hi) for name, lo, hi in experts}
    sigma_max, sigma_min = sampling.sigmas[-1].item(), sampling.sigmas[0].item()

    dense_t = 999.0 - 0.07 * torch.arange(0, 14271, dtype=torch.float64) - 0.013  # never near k + 0.5
    near_mid = torch.tensor([k + 0.5 + d for k in range(998, -1, -1) for d in (0.002, -0.002)])
    runs = [
        torch.cat([sampling.sigma(dense_t.float()), torch.zeros(1)]),
        torch.cat([sampling.sigma(near_mid.float()), torch.zeros(1)]),
        torch.cat([torch.tensor([40.0, 20.0]), sampling.sigmas.flip(0), torch.tensor([0.01, 0.0])]),
    ]
    runs += [karras(steps, sigma_min, sigma_max) for steps in (1, 2, 3, 4, 5, 6, 8, 12, 20, 30)]
    runs += [normal(sampling, steps) for steps in (3, 4, 7, 9, 20, 21, 25)]
    runs += [sgm_uniform(sampling, steps) for steps in (2, 8, 20)]
    boundaries = sorted({hi for _, _, hi in experts if hi < 1000})
    ties = {sampling.sigma(torch.tensor(k - 0.5)).item() for k in boundaries}
    if 500 in boundaries:  # t = 499.5 is on the normal 9/25-step and sgm_uniform 8-step schedules
        assert all(any(s.item() in ties for s in run) for run in runs[-5:-3] + runs[-2:-1])
    runs += [karras(20, sigma_min, sigma_max)[k:] for k in (5, 11)]  # denoise < 1: starts lower
    for sigmas in runs:
        active = run_sampler(sampling, groups, sigmas)
        calls = sigmas[sigmas > 0]
        t_unet = sampling.timestep(calls)
        assert len(active) == len(calls)
        for on, t, sigma in zip(active, t_unet.tolist(), calls.tolist()):
            assert len(on) == 1, f"t={t}: active {on}"
            lo, hi = by_name[on[0]]
            assert lo <= t < hi, f"sigma={sigma} (exact tie: {sigma in ties}): UNet t={t}, expert [{lo}, {hi})"
            assert expert_index(t, n) == [e for e, ex in enumerate(experts) if ex[0] == on[0]][0]


def test_default_guarantee_steps_would_double_apply_on_coarse_schedules():
    """Why CreateHookKeyframesInterpolated: a CreateHookKeyframe-only chain (guarantee_steps=1 on
    every keyframe) holds an expert whose interval no sigma falls in for one extra step."""
    sampling = SAMPLINGS[0]
    groups = [
        (e, KeyframeGroup([Keyframe(s, p) for p, s in expert_hook_schedule(*interval_timestep_range(e, 8))]))
        for e in range(8)
    ]
    sigmas = karras(3, sampling.sigmas[0].item(), sampling.sigmas[-1].item())
    assert any(len(on) > 1 for on in run_sampler(sampling, groups, sigmas))


# ---------------------------------------------------------------------------------------------
# Graph consistency
# ---------------------------------------------------------------------------------------------
def check_graph(wf):
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        assert key in wf
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "node ids must be unique"
    assert wf["last_node_id"] == max(nodes)
    links = {link[0]: link for link in wf["links"]}
    assert len(links) == len(wf["links"]), "link ids must be unique"
    assert wf["last_link_id"] == max(links)
    for n in wf["nodes"]:
        assert n["type"] in CORE_NODES, n["type"]
        inputs, n_widgets, outputs = CORE_NODES[n["type"]]
        assert [(i["name"], i["type"]) for i in n["inputs"]] == inputs, n["type"]
        assert [(o["name"], o["type"]) for o in n["outputs"]] == outputs, n["type"]
        assert len(n["widgets_values"]) == n_widgets, n["type"]
        for slot, inp in enumerate(n["inputs"]):
            if inp["link"] is None:
                assert inp["name"] not in REQUIRED_INPUTS.get(n["type"], set()), (n["type"], inp["name"])
                continue
            link_id, src, src_slot, dst, dst_slot, typ = links[inp["link"]]
            assert (dst, dst_slot) == (n["id"], slot)
            assert nodes[src]["outputs"][src_slot]["type"] == typ == inp["type"]
            assert link_id in nodes[src]["outputs"][src_slot]["links"]
        for slot, out in enumerate(n["outputs"]):
            assert out["slot_index"] == slot
            for link_id in out["links"] or []:
                assert links[link_id][1:3] == [n["id"], slot]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == typ
    # execution order: every link goes from a lower to a higher order
    orders = sorted(n["order"] for n in wf["nodes"])
    assert orders == list(range(len(nodes)))
    for _, src, _, dst, _, _ in wf["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"]
    return nodes, links


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 20])
@pytest.mark.parametrize("te", [None, "tsm_te.safetensors"])
def test_graph_is_consistent(n, te):
    wf = make_workflow(experts_of_scale(n), te)
    nodes, links = check_graph(wf)
    json.loads(json.dumps(wf))
    types = [x["type"] for x in wf["nodes"]]
    assert types.count("CreateHookLoraModelOnly") == n == types.count("SetHookKeyframes")
    assert types.count("LoraLoader") == (1 if te else 0)
    if te:
        lora = next(x for x in wf["nodes"] if x["type"] == "LoraLoader")
        assert lora["widgets_values"] == [te, 0.0, 0.8]  # strength_model 0: text encoder only
        assert {links[link][3] for link in lora["outputs"][1]["links"]} == {
            x["id"] for x in wf["nodes"] if x["type"] == "CLIPTextEncode"
        }

    def upstream(node_id):
        seen, todo = set(), [node_id]
        while todo:
            cur = todo.pop()
            for inp in nodes[cur]["inputs"]:
                if inp["link"] is not None and links[inp["link"]][1] not in seen:
                    seen.add(links[inp["link"]][1])
                    todo.append(links[inp["link"]][1])
        return seen

    ksampler = next(x for x in wf["nodes"] if x["type"] == "KSampler")
    props = next(x for x in wf["nodes"] if x["type"] == "PairConditioningSetProperties")
    pos_src, neg_src = (links[ksampler["inputs"][i]["link"]] for i in (1, 2))
    assert (pos_src[1], pos_src[2], neg_src[1], neg_src[2]) == (props["id"], 0, props["id"], 1)
    hooks_up = upstream(props["id"])
    assert {x["id"] for x in wf["nodes"] if x["type"] == "SetHookKeyframes"} <= hooks_up
    model_src = links[ksampler["inputs"][0]["link"]]
    assert nodes[model_src[1]]["type"] == "CheckpointLoaderSimple"
    assert ksampler["widgets_values"] == [42, "fixed", 30, 7.0, "euler", "normal", 1.0]
    save = next(x for x in wf["nodes"] if x["type"] == "SaveImage")
    assert ksampler["id"] in upstream(save["id"])
    for x in wf["nodes"]:
        if x["type"] == "CreateHookLoraModelOnly":
            assert x["widgets_values"][1] == 0.8
        if x["type"] in ("CreateHookKeyframe", "CreateHookKeyframesInterpolated"):
            for v in x["widgets_values"]:
                if isinstance(v, float):
                    assert math.isfinite(v)
            if x["type"] == "CreateHookKeyframesInterpolated":
                s0, s1, _, p0, p1, count, _ = x["widgets_values"]
                assert 0.0 <= s0 <= 10.0 and 0.0 <= s1 <= 10.0 and 0.0 <= p0 <= p1 <= 1.0 and count == 2


def test_rejects_bad_expert_lists():
    with pytest.raises(ValueError):
        make_workflow([])
    with pytest.raises(ValueError):
        make_workflow([("a.safetensors", 0, 500), ("b.safetensors", 400, 1000)])
    with pytest.raises(ValueError):
        make_workflow([("a.safetensors", 0, 1001)])
    # a gap is allowed: the base model runs there
    wf = make_workflow([("a.safetensors", 0, 125), ("b.safetensors", 875, 1000)])
    check_graph(wf)


def test_write_workflow_round_trips(tmp_path):
    wf = make_workflow(experts_of_scale(8))
    path = tmp_path / "sub" / "tsm8_workflow.json"
    old_umask = os.umask(0o022)
    try:
        write_workflow(path, wf)
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # readable by a UI running as another user
    assert json.loads(path.read_text(encoding="utf-8")) == wf
    write_workflow(str(path), {"nodes": [], "links": []})  # overwrite in place
    assert json.loads(path.read_text(encoding="utf-8")) == {"nodes": [], "links": []}
    assert sorted(os.listdir(path.parent)) == ["tsm8_workflow.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        write_workflow(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"nodes": [], "links": []}
    assert sorted(os.listdir(path.parent)) == ["tsm8_workflow.json"]
