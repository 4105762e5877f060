"""A ComfyUI workflow (UI format) that switches the exported TSM experts by noise level.

``tools/export_experts.py --comfyui-workflow`` writes one standard kohya LoRA per expert (expert
``e`` of scale ``n`` covers the integer timesteps ``[lo, hi) = interval_timestep_range(e, n)``)
and this module writes a txt2img graph, with ComfyUI core nodes only, that applies expert ``e``
exactly while the timestep the UNet receives lies in ``[lo, hi)``.

Why hooks and not step ranges
-----------------------------
docs/design.md section 6: the expert is chosen by the *noise level* (the sigma the sampler hands the
denoiser, converted to ``t`` as the UNet receives it), never by the step counter. Chaining
``KSamplerAdvanced`` over ``start_at_step/end_at_step`` ties the switch to step indices, whose
noise levels depend on the scheduler, the step count and ``denoise``; a workflow built that way
is wrong as soon as a user changes any of them. ComfyUI's hook keyframes are keyed by sigma:

* ``comfy/hooks.py`` ``HookKeyframeGroup.initialize_timesteps`` sets
  ``keyframe.start_t = model.model_sampling.percent_to_sigma(keyframe.start_percent)``, and
  ``prepare_current_keyframe(curr_t)`` (called from ``comfy/samplers.py`` ``_calc_cond_batch``
  via ``ModelPatcher.prepare_hook_patches_current_keyframe`` with ``curr_t`` = the sigma of the
  model call) moves to the next keyframe ``i`` while ``keyframes[i].start_t >= curr_t``.
* ``comfy/model_sampling.py`` ``ModelSamplingDiscrete.percent_to_sigma(p)`` is ``999999999.9``
  for ``p <= 0``, ``0.0`` for ``p >= 1``, else ``sigma(float32((1 - p) * 999))`` where ``sigma``
  interpolates ``log_sigmas`` linearly between the neighbouring integer timesteps; and
  ``ModelSamplingDiscrete.timestep(sigma)`` (what the UNet receives) is the *nearest* integer
  timestep in log-sigma (``argmin`` over ``|log sigma - log_sigmas|``).

So a keyframe at the percent whose ``(1 - p) * 999`` is the half-integer ``k - 0.5`` switches at
``sigma(k - 0.5) = exp((log_sigmas[k-1] + log_sigmas[k]) / 2)``, which is exactly the rounding
boundary of ``timestep()``: it is reached (``start_t >= sigma``) iff the UNet's integer ``t`` is
``<= k - 1``, i.e. ``< k``. Expert ``e`` gets the keyframes "strength 0 from 0 %, strength 1 from
the percent of ``hi - 0.5``, strength 0 from the percent of ``lo - 0.5``" and is therefore on
iff ``lo <= t < hi``, for every sampler, scheduler, step count and ``denoise``.
(The expert with ``hi = T`` is on from 0 %; the one with ``lo = 0`` has no off keyframe. Sigmas
above ``sigma_max`` / below ``sigma_min`` clamp to t = 999 / 0 in ``timestep()`` and get the top
/ bottom expert, consistently.)

``guarantee_steps``: ``HookKeyframe`` defaults to ``guarantee_steps=1``: once a keyframe is
entered it is kept for that many model calls (distinct sigmas) before the next one is looked at,
unless it started before the sampling range (``start_t > max(sample_sigmas)``, e.g. percent 0).
With ``CreateHookKeyframe`` (always ``guarantee_steps=1``) the "on" keyframe of an expert whose
interval holds no sampled sigma (few steps) would still be held for one step, next to the correct
expert. ``CreateHookKeyframesInterpolated`` gives ``guarantee_steps=1`` to its first keyframe
and 0 to the rest, so each expert uses one ``CreateHookKeyframesInterpolated`` (count 2:
``(0 %, s0)``, ``(p_on_or_off, s1)``) and, for a middle expert, one ``CreateHookKeyframe`` for
its last keyframe (a guarantee on the last keyframe changes nothing). Every switch then happens
at the first model call past the boundary, and an interval no sigma falls in is skipped.

Float32 detail: ``CreateHookKeyframesInterpolated`` builds its percents with ``torch.linspace``
(float32), while ``CreateHookKeyframe`` keeps the float64 value. Every percent written here is a
float32 number (so both nodes see the same value and the off keyframe of expert ``e`` and the on
keyframe of expert ``e - 1`` have the identical ``start_t``: exactly one expert is active at any
sigma), chosen so that the keyframe's own sigma is the largest one the UNet maps to ``k - 1``
(:func:`boundary_percent`, computed on the model's float32 sigma table exactly as ComfyUI computes
it). A sigma *exactly* at ``sigma(k - 0.5)`` (the "normal" scheduler at 3, 9 or 25 steps and
"sgm_uniform" at 8 put one at t = 499.5) therefore gets the expert of the integer t the UNet gets
for it, as the `Load TSM LoRA` node does; only a float32 sigma strictly between two neighbouring
candidate keyframe sigmas (a window of a few 1e-5 timesteps, which no scheduler here produces) could
be routed to the neighbouring expert. Checked against ComfyUI's real ``model_sampling`` and hook
keyframe code in tests/test_ext_comfyui_real.py.

Scope and limits: the percent -> sigma mapping above is ``ModelSamplingDiscrete``'s (SD 1.x,
SD 2.x eps/v, SDXL, and any model using a discrete 1000-step sigma table, whatever its betas).
Flow models (SD3, Flux) map percent to sigma differently (with their shift) and are not handled.
Keyframes only move forward, so samplers whose model calls go back up in sigma (``restart``)
are not supported; every standard k-diffusion sampler calls the model at non-increasing sigmas.
Hooks are attached to both conditionings (``PairConditioningSetProperties``), so the expert
applies to the positive and the negative (CFG) pass alike, as in training-free inference.

The graph: CheckpointLoaderSimple -> [LoraLoader, strength_model 0: the static text-encoder
LoRA] -> CLIPTextEncode x2 -> PairConditioningSetProperties(hooks) -> KSampler -> VAEDecode ->
SaveImage, with per expert CreateHookLoraModelOnly -> SetHookKeyframes(<- keyframe nodes),
merged by CombineHooks2/4/8.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence

import torch

from tsm_trainer.core.atomic_write import atomic_file
from tsm_trainer.runtime.discrete_sigmas import DiscreteSigmas

# ComfyUI's discrete model sampling hard-codes 999 (= len(sigmas) - 1) in percent_to_sigma.
_DEFAULT_T = 1000

# Core node definitions (ComfyUI nodes.py and comfy_extras/nodes_hooks.py): link inputs in
# declaration order (required, then optional) with their types, widget names in
# widgets_values order, outputs (name, type). KSampler's seed widget is followed by the
# frontend's "control_after_generate" value in widgets_values.
NODE_DEFS: dict[str, dict] = {
    "CheckpointLoaderSimple": {
        "inputs": [],
        "widgets": ["ckpt_name"],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    },
    "LoraLoader": {
        "inputs": [("model", "MODEL"), ("clip", "CLIP")],
        "widgets": ["lora_name", "strength_model", "strength_clip"],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP")],
    },
    "CLIPTextEncode": {
        "inputs": [("clip", "CLIP")],
        "widgets": ["text"],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "CreateHookLoraModelOnly": {
        "inputs": [("prev_hooks", "HOOKS")],
        "widgets": ["lora_name", "strength_model"],
        "outputs": [("HOOKS", "HOOKS")],
    },
    "CreateHookKeyframe": {
        "inputs": [("prev_hook_kf", "HOOK_KEYFRAMES")],
        "widgets": ["strength_mult", "start_percent"],
        "outputs": [("HOOK_KF", "HOOK_KEYFRAMES")],
    },
    "CreateHookKeyframesInterpolated": {
        "inputs": [("prev_hook_kf", "HOOK_KEYFRAMES")],
        "widgets": [
            "strength_start",
            "strength_end",
            "interpolation",
            "start_percent",
            "end_percent",
            "keyframes_count",
            "print_keyframes",
        ],
        "outputs": [("HOOK_KF", "HOOK_KEYFRAMES")],
    },
    "SetHookKeyframes": {
        "inputs": [("hooks", "HOOKS"), ("hook_kf", "HOOK_KEYFRAMES")],
        "widgets": [],
        "outputs": [("HOOKS", "HOOKS")],
    },
    "CombineHooks2": {
        "inputs": [(f"hooks_{c}", "HOOKS") for c in "AB"],
        "widgets": [],
        "outputs": [("HOOKS", "HOOKS")],
    },
    "CombineHooks4": {
        "inputs": [(f"hooks_{c}", "HOOKS") for c in "ABCD"],
        "widgets": [],
        "outputs": [("HOOKS", "HOOKS")],
    },
    "CombineHooks8": {
        "inputs": [(f"hooks_{c}", "HOOKS") for c in "ABCDEFGH"],
        "widgets": [],
        "outputs": [("HOOKS", "HOOKS")],
    },
    "PairConditioningSetProperties": {
        "inputs": [
            ("positive_NEW", "CONDITIONING"),
            ("negative_NEW", "CONDITIONING"),
            ("mask", "MASK"),
            ("hooks", "HOOKS"),
            ("timesteps", "TIMESTEPS_RANGE"),
        ],
        "widgets": ["strength", "set_cond_area"],
        "outputs": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    },
    "EmptyLatentImage": {
        "inputs": [],
        "widgets": ["width", "height", "batch_size"],
        "outputs": [("LATENT", "LATENT")],
    },
    "KSampler": {
        "inputs": [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        "widgets": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "outputs": [("LATENT", "LATENT")],
    },
    "VAEDecode": {
        "inputs": [("samples", "LATENT"), ("vae", "VAE")],
        "widgets": [],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "SaveImage": {
        "inputs": [("images", "IMAGE")],
        "widgets": ["filename_prefix"],
        "outputs": [],
    },
}

_COMBINE_NODES = ((2, "CombineHooks2"), (4, "CombineHooks4"), (8, "CombineHooks8"))


# ---------------------------------------------------------------------------------------------
# Schedule math
# ---------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    """Round a float to float32 (round to nearest even), as ``torch.tensor(x)`` does."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _percent_for_t(t_p: float, T: int) -> float | None:
    """A float32 percent ``p`` in (0, 1) with ``float32((1 - p) * (T - 1)) == t_p``, or None."""
    lo, hi = _bits(0.0), _bits(1.0)  # float32 bit patterns of non-negative floats are ordered
    while lo < hi:  # smallest p with t(p) <= t_p (t(p) is non-increasing in p)
        mid = (lo + hi) // 2
        if _f32((1.0 - _from_bits(mid)) * (T - 1)) <= t_p:
            hi = mid
        else:
            lo = mid + 1
    p = _from_bits(lo)
    return p if 0.0 < p < 1.0 and _f32((1.0 - p) * (T - 1)) == t_p else None


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def boundary_percent(k: int, T: int = _DEFAULT_T, sampling: DiscreteSigmas | None = None) -> float:
    """``start_percent`` whose keyframe switches exactly where the UNet's integer t goes from k to k - 1.

    ComfyUI computes ``t_p = float32((1 - p) * (T - 1))``, ``start_t = sigma(t_p)``, and enters the keyframe
    at the first model call with ``sigma <= start_t``; the UNet gets ``timestep(sigma)``, the nearest
    integer in log-sigma, which flips from k to k - 1 near ``t = k - 0.5``. At ``sigma(k - 0.5)`` itself
    (a sigma the "normal" and "sgm_uniform" schedulers produce, e.g. t = 499.5 at 9 or 25 normal steps)
    the nearest integer is decided by float32 rounding: k for some boundaries, k - 1 for others.
    So, for the model's sigma table (``sampling``; default: SD1/SD2/SDXL's scaled-linear table), ``t_p``
    is the largest float32 near ``k - 0.5`` that has a float32 percent and whose ``sigma(t_p)`` the
    UNet maps to ``k - 1``: every sigma at or below it gets ``t <= k - 1``, every sigma above it ``t >= k``
    (up to the float32 sigmas strictly between two consecutive candidates). Below t ~ 500 float32
    percents reach only every ~6e-5 of t; where the UNet gives the exact ``sigma(k - 0.5)`` to ``k - 1``
    and no percent lands on it, the nearest candidate above is used, so that scheduler-made sigma still
    gets the UNet's expert (a sigma within ~6e-5 timesteps above it would get the lower one). Valid for
    ``1 <= k <= T - 1``; the result is a float32 number (``CreateHookKeyframesInterpolated``'s float32
    linspace keeps it unchanged).
    """
    if not 1 <= k <= T - 1:
        raise ValueError(f"boundary timestep k={k} must be in [1, {T - 1}]")
    sampling = _sd_sampling(T) if sampling is None else sampling
    # Candidates (t_p, p): float32 timesteps around k - 0.5 that some float32 percent reaches (near
    # t = 999 every float32 t is reachable; near t = 0 only every ~1000th is, so walk over p too).
    candidates = set()
    t = _from_bits(_bits(_f32(k - 0.5)) - 24)
    for _ in range(49):
        p = _percent_for_t(t, T)
        if p is not None:
            candidates.add((t, p))
        t = _from_bits(_bits(t) + 1)
    p0 = _bits(_f32(1.0 - (k - 0.5) / (T - 1)))
    for p in (_from_bits(p0 + d) for d in range(-24, 25)):
        if 0.0 < p < 1.0 and _percent_for_t(_f32((1.0 - p) * (T - 1)), T) == p:  # one p per t: the smallest
            candidates.add((_f32((1.0 - p) * (T - 1)), p))
    candidates = sorted(candidates)
    sigmas = sampling.sigma(torch.tensor([c[0] for c in candidates], dtype=torch.float32))
    lower = [c for c, unet_t in zip(candidates, sampling.timestep(sigmas).tolist()) if unet_t <= k - 1]
    if not lower:
        raise AssertionError(f"no keyframe percent reaches t = {k - 1} near t = {k - 0.5}")
    best = max(lower)
    tie = sampling.sigma(torch.tensor([k - 0.5], dtype=torch.float32))
    if best[0] < k - 0.5 and sampling.timestep(tie).item() == k - 1:
        # The UNet gives sigma(k - 0.5) (which schedulers produce) to k - 1, but no float32 percent
        # lands on t = k - 0.5 (below t ~ 500 they are ~6e-5 apart): take the nearest one above it.
        best = min(c for c in candidates if c[0] >= k - 0.5)
    return best[1]


_SD_SAMPLING: dict[int, DiscreteSigmas] = {}


def _sd_sampling(T: int) -> DiscreteSigmas:
    if T not in _SD_SAMPLING:
        _SD_SAMPLING[T] = DiscreteSigmas(timesteps=T)
    return _SD_SAMPLING[T]


def expert_hook_schedule(
    lo: int, hi: int, T: int = _DEFAULT_T, sampling: DiscreteSigmas | None = None
) -> list[tuple[float, float]]:
    """Hook keyframes ``[(start_percent, strength), ...]`` that make an expert active for t in [lo, hi).

    ``t`` is the integer timestep ComfyUI's ``ModelSamplingDiscrete.timestep(sigma)`` hands the
    UNet. The keyframe at ``boundary_percent(k)`` takes effect at the first model call whose
    sigma is ``<= sigma(k - 0.5)``, i.e. whose ``t <= k - 1``. Hence: strength 0 from 0 % (unless
    ``hi == T``: then strength 1 from 0 %), strength 1 from ``boundary_percent(hi)``, strength 0
    from ``boundary_percent(lo)`` (omitted when ``lo == 0``). Boundaries: ``t = lo`` is on,
    ``t = hi`` is off, including at a sigma exactly equal to ``sigma(k - 0.5)`` (see
    :func:`boundary_percent`). ``sampling``: the model's sigma table (default SD1/SD2/SDXL's).
    Strengths are multipliers of the hook LoRA's own strength.
    """
    if not (isinstance(lo, int) and isinstance(hi, int)):
        raise TypeError(f"lo and hi must be integers, got {lo!r}, {hi!r}")
    if not 0 <= lo < hi <= T:
        raise ValueError(f"need 0 <= lo < hi <= T, got lo={lo}, hi={hi}, T={T}")
    if hi == T:
        schedule = [(0.0, 1.0)]
    else:
        schedule = [(0.0, 0.0), (boundary_percent(hi, T, sampling), 1.0)]
    if lo > 0:
        schedule.append((boundary_percent(lo, T, sampling), 0.0))
    return schedule


# ---------------------------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(
        self,
        node_type: str,
        widgets: list,
        pos: tuple[float, float],
        title: str | None = None,
        size: tuple[float, float] = (315, 100),
    ) -> dict:
        spec = NODE_DEFS[node_type]
        if len(widgets) != len(spec["widgets"]):
            raise AssertionError(f"{node_type}: {len(widgets)} widget values for {spec['widgets']}")
        node = {
            "id": len(self.nodes) + 1,
            "type": node_type,
            "pos": [float(pos[0]), float(pos[1])],
            "size": [float(size[0]), float(size[1])],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in spec["inputs"]],
            "outputs": [
                {"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(spec["outputs"])
            ],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, src_slot: int, dst: dict, dst_input: str) -> None:
        out = src["outputs"][src_slot]
        dst_slot = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == dst_input)
        inp = dst["inputs"][dst_slot]
        if inp["type"] != out["type"]:
            raise AssertionError(f"type mismatch {src['type']}.{out['name']} -> {dst['type']}.{dst_input}")
        if inp["link"] is not None:
            raise AssertionError(f"{dst['type']}.{dst_input} is already linked")
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], src_slot, dst["id"], dst_slot, out["type"]])
        out["links"].append(link_id)
        inp["link"] = link_id

    def set_order(self) -> None:
        """LiteGraph's "order": a topological order of the nodes (sources first)."""
        preds = {n["id"]: set() for n in self.nodes}
        for _, src, _, dst, _, _ in self.links:
            preds[dst].add(src)
        done: list[int] = []
        remaining = [n["id"] for n in self.nodes]
        while remaining:
            ready = [i for i in remaining if preds[i] <= set(done)]
            if not ready:
                raise AssertionError("cycle in workflow graph")
            done.extend(ready)
            remaining = [i for i in remaining if i not in ready]
        order = {node_id: k for k, node_id in enumerate(done)}
        for n in self.nodes:
            n["order"] = order[n["id"]]


def _keyframe_nodes(g: _Graph, schedule: list[tuple[float, float]], x: float, y: float, label: str) -> dict:
    """Keyframe nodes for one expert; returns the node whose HOOK_KF output holds them all.

    The first two keyframes come from one CreateHookKeyframesInterpolated (count 2, linear), so
    the second gets guarantee_steps 0; a third (the last) comes from CreateHookKeyframe.
    """
    if len(schedule) == 1:
        ((p0, s0),) = schedule
        return g.add("CreateHookKeyframe", [s0, p0], (x, y), title=f"{label} keyframe", size=(300, 82))
    if len(schedule) > 3:
        raise AssertionError("a schedule has at most 3 keyframes")
    (p0, s0), (p1, s1) = schedule[:2]
    kf = g.add(
        "CreateHookKeyframesInterpolated",
        [s0, s1, "linear", p0, p1, 2, False],
        (x, y),
        title=f"{label} keyframes",
        size=(300, 210),
    )
    if len(schedule) == 3:
        p2, s2 = schedule[2]
        last = g.add("CreateHookKeyframe", [s2, p2], (x, y + 240), title=f"{label} off", size=(300, 82))
        g.link(kf, 0, last, "prev_hook_kf")
        kf = last
    return kf


def _combine(g: _Graph, hooks: list[dict], x: float, y: float) -> dict:
    """Merge HOOKS outputs with CombineHooks2/4/8 (a tree when there are more than 8)."""
    level = 0
    while len(hooks) > 1:
        merged = []
        for start in range(0, len(hooks), 8):
            chunk = hooks[start : start + 8]
            if len(chunk) == 1:
                merged.append(chunk[0])
                continue
            size, node_type = next((s, t) for s, t in _COMBINE_NODES if s >= len(chunk))
            node = g.add(node_type, [], (x + 340 * level, y + 60 * start), size=(240, 30 + 22 * size))
            for i, h in enumerate(chunk):
                g.link(h, 0, node, "hooks_" + "ABCDEFGH"[i])
            merged.append(node)
        hooks = merged
        level += 1
    return hooks[0]


def build_workflow(
    expert_files: Sequence[tuple[str, int, int]],
    checkpoint_name: str,
    text_encoder_lora: str | None,
    prompt: str,
    negative: str,
    steps: int,
    cfg: float,
    seed: int,
    width: int,
    height: int,
    strength: float = 1.0,
    *,
    text_encoder_strength: float | None = None,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    filename_prefix: str = "tsm",
    num_train_timesteps: int = _DEFAULT_T,
    sampling: DiscreteSigmas | None = None,
) -> dict:
    """A ComfyUI UI-format workflow (nodes/links/last_node_id/last_link_id/version) for txt2img.

    Args:
        expert_files: ``(lora_name, lo, hi)`` per expert: the file name as ComfyUI lists it under
            ``models/loras`` and the integer timesteps ``[lo, hi)`` it covers
            (``interval_timestep_range``). Intervals must not overlap; a gap runs the base model.
        checkpoint_name: as listed under ``models/checkpoints`` (a discrete-sigma model: SD1/2/XL).
        text_encoder_lora: the static text-encoder LoRA (applied by LoraLoader with
            ``strength_model = 0``), or None.
        strength: LoRA strength of every expert (``CreateHookLoraModelOnly.strength_model``).
        text_encoder_strength: ``strength_clip`` of the text-encoder LoRA (default: ``strength``).
        sampling: the checkpoint's float32 sigma table (default: SD1/SD2/SDXL's scaled-linear one).

    Expert ``(name, lo, hi)`` is active exactly for the model calls whose UNet timestep
    ``t = model_sampling.timestep(sigma)`` satisfies ``lo <= t < hi`` (see the module docstring
    and ``expert_hook_schedule``), whatever the sampler, scheduler, steps or denoise.
    """
    T = num_train_timesteps
    experts = [(str(name), int(lo), int(hi)) for name, lo, hi in expert_files]
    if not experts:
        raise ValueError("build_workflow: no expert files")
    for name, lo, hi in experts:
        if not 0 <= lo < hi <= T:
            raise ValueError(f"expert {name!r}: need 0 <= lo < hi <= {T}, got [{lo}, {hi})")
    ordered = sorted(experts, key=lambda e: e[1])
    for (n1, _, hi1), (n2, lo2, _) in zip(ordered, ordered[1:]):
        if lo2 < hi1:
            raise ValueError(f"expert intervals overlap: {n1!r} ends at {hi1}, {n2!r} starts at {lo2}")
    te_strength = strength if text_encoder_strength is None else text_encoder_strength

    g = _Graph()
    ckpt = g.add("CheckpointLoaderSimple", [checkpoint_name], (0, 200), size=(315, 98))
    clip_src, clip_slot = ckpt, 1
    if text_encoder_lora:
        te = g.add(
            "LoraLoader",
            [text_encoder_lora, 0.0, te_strength],
            (0, 380),
            title="TSM text-encoder LoRA (static)",
            size=(315, 126),
        )
        g.link(ckpt, 0, te, "model")
        g.link(ckpt, 1, te, "clip")
        clip_src, clip_slot = te, 1
    pos = g.add("CLIPTextEncode", [prompt], (400, 120), title="Positive", size=(400, 200))
    neg = g.add("CLIPTextEncode", [negative], (400, 360), title="Negative", size=(400, 200))
    g.link(clip_src, clip_slot, pos, "clip")
    g.link(clip_src, clip_slot, neg, "clip")

    # One column block per expert, top expert (highest noise) first.
    hooks = []
    x0, y0 = 0.0, 650.0
    for row, (name, lo, hi) in enumerate(sorted(experts, key=lambda e: -e[1])):
        label = f"TSM t in [{lo},{hi})"
        y = y0 + row * 380
        schedule = expert_hook_schedule(lo, hi, T, sampling)
        lora = g.add("CreateHookLoraModelOnly", [name, strength], (x0, y), title=label, size=(315, 82))
        kf = _keyframe_nodes(g, schedule, x0 + 340, y, label)
        setkf = g.add("SetHookKeyframes", [], (x0 + 680, y), title=f"{label} schedule", size=(240, 46))
        g.link(lora, 0, setkf, "hooks")
        g.link(kf, 0, setkf, "hook_kf")
        hooks.append(setkf)
    combined = _combine(g, hooks, x0 + 960, y0)

    props = g.add("PairConditioningSetProperties", [1.0, "default"], (900, 300), size=(300, 166))
    g.link(pos, 0, props, "positive_NEW")
    g.link(neg, 0, props, "negative_NEW")
    g.link(combined, 0, props, "hooks")

    latent = g.add("EmptyLatentImage", [int(width), int(height), 1], (900, 520), size=(315, 106))
    sampler = g.add(
        "KSampler",
        [int(seed), "fixed", int(steps), float(cfg), sampler_name, scheduler, 1.0],
        (1250, 200),
        size=(315, 262),
    )
    g.link(ckpt, 0, sampler, "model")
    g.link(props, 0, sampler, "positive")
    g.link(props, 1, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode = g.add("VAEDecode", [], (1600, 200), size=(210, 46))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    save = g.add("SaveImage", [filename_prefix], (1850, 200), size=(400, 450))
    g.link(decode, 0, save, "images")
    g.set_order()

    return {
        "last_node_id": len(g.nodes),
        "last_link_id": len(g.links),
        "nodes": g.nodes,
        "links": g.links,
        "groups": [],
        "config": {},
        "extra": {
            "ds": {"scale": 1.0, "offset": [0.0, 0.0]},
            "tsm": {
                "note": "expert LoRAs switched by hook keyframes on the sampler's sigma: active iff "
                "lo <= model_sampling.timestep(sigma) < hi",
                "num_train_timesteps": T,
                "experts": [
                    {
                        "lora_name": n,
                        "timestep_range": [lo, hi],
                        "keyframes": [list(k) for k in expert_hook_schedule(lo, hi, T, sampling)],
                    }
                    for n, lo, hi in experts
                ],
            },
        },
        "version": 0.4,
    }


def write_workflow(path: str | os.PathLike, workflow: dict) -> None:
    """Write ``workflow`` as JSON atomically: a temp file in the same folder, then ``os.replace``."""
    with atomic_file(path, suffix=".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(workflow, f, indent=2, ensure_ascii=False)
        f.write("\n")
