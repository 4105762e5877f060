"""kohya sd-scripts dataset config TOML: strict loading into frozen dataclasses.

The file layout is kohya's, unchanged::

    [general]                 # any dataset-level or subset-level key
    [[datasets]]              # dataset-level keys + subset-level keys (inherited by its subsets)
      [[datasets.subsets]]    # subset-level keys, image_dir (required), is_reg, video_frames

A value is looked up subset -> dataset -> general -> ``defaults`` (the trainer's command-line
values, like kohya's argparse fallback) -> kohya's default. Dataset-level keys (resolution,
batch_size, bucket settings) are not valid inside a subset, as in kohya.

Extension (tsm-trainer only, subset level): ``video_frames = N`` makes every sub-folder of
image_dir one video clip whose first N frames (sorted by file name) form a sample.

Every error is a :class:`DatasetConfigError` naming the key, the file and what is valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsm_trainer.data.errors import DatasetConfigError

# key -> (checker, description of what is valid). A checker returns the converted value or raises ValueError.


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError
    return v


def _int(lo=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            raise ValueError
        return v

    return check


def _false(v):
    """A kohya key whose feature is not implemented: only its default (false) is accepted."""
    if v is not False:
        raise ValueError
    return v


def _float01(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError
    return float(v)


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError
    return float(v)


def _str(v):
    if not isinstance(v, str):
        raise ValueError
    return v


def _extension(v):
    """kohya adds the missing leading dot: "txt" -> ".txt"."""
    v = _str(v)
    return v if not v or v.startswith(".") else "." + v


def _resolution(v):
    """int r -> (r, r); [w, h] -> (w, h). Returned as (width, height), kohya's order."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
    ):
        return (int(v[0]), int(v[1]))
    raise ValueError


Spec = tuple[Callable[[Any], Any], str]

DATASET_KEYS: dict[str, Spec] = {
    "resolution": (_resolution, "a positive integer or [width, height]"),
    "batch_size": (_int(1), "an integer >= 1"),
    "enable_bucket": (_bool, "true or false"),
    "min_bucket_reso": (_int(1), "an integer >= 1"),
    "max_bucket_reso": (_int(1), "an integer >= 1"),
    "bucket_reso_steps": (_int(8), "an integer >= 8, a multiple of 8"),
    "bucket_no_upscale": (_bool, "true or false"),
    "network_multiplier": (_float, "a number"),
}
SUBSET_KEYS: dict[str, Spec] = {  # valid at every level, inherited downward
    "num_repeats": (_int(1), "an integer >= 1"),
    "caption_extension": (_extension, 'a string such as ".txt"'),
    "class_tokens": (_str, "a string"),
    "shuffle_caption": (_bool, "true or false"),
    "caption_separator": (_str, "a string"),
    "keep_tokens": (_int(0), "an integer >= 0"),
    "keep_tokens_separator": (_str, "a string"),
    "secondary_separator": (_str, "a string"),
    "enable_wildcard": (_bool, "true or false"),
    "caption_prefix": (_str, "a string"),
    "caption_suffix": (_str, "a string"),
    "caption_dropout_rate": (_float01, "a number in [0, 1]"),
    "caption_dropout_every_n_epochs": (_int(0), "an integer >= 0"),
    "caption_tag_dropout_rate": (_float01, "a number in [0, 1]"),
    "flip_aug": (_bool, "true or false"),
    "random_crop": (_bool, "true or false"),
    "cache_info": (
        _false,
        "false: kohya's image-size cache is not implemented (sizes are read at each scan); remove the key",
    ),
}
SUBSET_ONLY_KEYS: dict[str, Spec] = {
    "image_dir": (_str, "a folder path"),
    "is_reg": (_bool, "true or false"),
    "video_frames": (_int(1), "an integer >= 1 (frames per clip; sub-folders of image_dir are clips)"),
}
# Valid in kohya but not implemented here: named as such instead of "unknown".
KOHYA_UNSUPPORTED = (
    "color_aug",
    "face_crop_aug_range",
    "token_warmup_min",
    "token_warmup_step",
    "custom_attributes",
    "resize_interpolation",
    "validation_seed",
    "validation_split",
    "metadata_file",
    "conditioning_data_dir",
    "alpha_mask",
    "debug_dataset",
    "prior_loss_weight",
)
GENERAL_VALID = {**DATASET_KEYS, **SUBSET_KEYS}
DATASET_VALID = {**DATASET_KEYS, **SUBSET_KEYS, "subsets": None}
SUBSET_VALID = {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}

KOHYA_DEFAULTS: dict[str, Any] = {
    "resolution": None,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "network_multiplier": 1.0,
    "num_repeats": 1,
    "caption_extension": ".caption",
    "class_tokens": None,
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": None,
    "secondary_separator": None,
    "enable_wildcard": False,
    "caption_prefix": None,
    "caption_suffix": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "flip_aug": False,
    "random_crop": False,
    "cache_info": False,
    "is_reg": False,
    "video_frames": None,
}


@dataclass(frozen=True)
class SubsetConfig:
    """One `[[datasets.subsets]]` table after inheritance. `where` locates it in the file for messages."""

    image_dir: Path
    where: str
    num_repeats: int = 1
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    cache_info: bool = False
    is_reg: bool = False
    video_frames: int | None = None

    @property
    def captions_static(self) -> bool:
        """True when the processed caption never changes between epochs (text-encoder cache is valid)."""
        return not (
            self.shuffle_caption
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
            or self.enable_wildcard
        )


@dataclass(frozen=True)
class DatasetConfig:
    """One `[[datasets]]` table. resolution is (width, height) as in kohya."""

    resolution: tuple[int, int]
    where: str
    subsets: tuple[SubsetConfig, ...]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0

    @property
    def video_frames(self) -> int | None:
        return self.subsets[0].video_frames


@dataclass(frozen=True)
class DataConfig:
    """The whole file: `datasets` in file order, `source` the TOML path."""

    datasets: tuple[DatasetConfig, ...]
    source: str = "<dict>"

    @property
    def captions_static(self) -> bool:
        return all(s.captions_static for d in self.datasets for s in d.subsets)


def _check_table(table: Any, valid: Mapping[str, Spec | None], level: str, where: str, file: str) -> dict:
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{file}: {where} must be a table ({level}), got {type(table).__name__}")
    out = {}
    for key, value in table.items():
        if key not in valid:
            if key in KOHYA_UNSUPPORTED:
                raise DatasetConfigError(
                    f"{file}: {where}: key '{key}' is a kohya option that tsm-trainer does not support; remove it"
                )
            hint = ""
            if key in SUBSET_ONLY_KEYS:
                hint = " (it is valid only inside [[datasets.subsets]])"
            elif key in DATASET_KEYS:
                hint = " (it is a dataset-level key: put it in [[datasets]] or [general])"
            raise DatasetConfigError(
                f"{file}: {where}: unknown key '{key}'{hint}; valid keys at the {level} level: "
                + ", ".join(sorted(valid))
            )
        spec = valid[key]
        if spec is None:
            continue
        checker, expected = spec
        try:
            out[key] = checker(value)
        except ValueError:
            raise DatasetConfigError(
                f"{file}: {where}: key '{key}' = {value!r} is invalid; expected {expected}"
            ) from None
    return out


def parse_dataset_config(
    raw: Mapping[str, Any], file: str = "<dict>", defaults: Mapping[str, Any] | None = None
) -> DataConfig:
    """Validate a parsed TOML mapping. `defaults` plays kohya's argparse role (e.g. resolution, batch_size)."""
    top = {"general": None, "datasets": None}
    for key in raw:
        if key not in top:
            raise DatasetConfigError(f"{file}: unknown top-level key '{key}'; valid: [general], [[datasets]]")
    fallback = dict(KOHYA_DEFAULTS)
    if defaults:
        fallback.update(_check_table(dict(defaults), GENERAL_VALID, "general", "defaults", file))
    general = _check_table(raw.get("general", {}), GENERAL_VALID, "general", "[general]", file)
    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise DatasetConfigError(f"{file}: no [[datasets]] table; at least one dataset with one subset is required")
    datasets = []
    for di, ds_raw in enumerate(datasets_raw):
        dwhere = f"[[datasets]] #{di + 1}"
        ds = _check_table(ds_raw, DATASET_VALID, "dataset", dwhere, file)
        subsets_raw = ds_raw.get("subsets", [])
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise DatasetConfigError(f"{file}: {dwhere} has no [[datasets.subsets]]; at least one is required")
        chain = [ds, general, fallback]
        pick = lambda key, ch: next(t[key] for t in ch if key in t)  # noqa: E731
        subsets = []
        for si, ss_raw in enumerate(subsets_raw):
            swhere = f"{dwhere}, [[datasets.subsets]] #{si + 1}"
            ss = _check_table(ss_raw, SUBSET_VALID, "subset", swhere, file)
            if "image_dir" not in ss:
                raise DatasetConfigError(f"{file}: {swhere}: required key 'image_dir' is missing")
            vals = {k: pick(k, [ss] + chain) for k in SUBSET_VALID}
            vals["image_dir"] = Path(vals["image_dir"])
            subsets.append(SubsetConfig(where=f"{file}: {swhere}", **vals))
        dvals = {k: pick(k, chain) for k in DATASET_KEYS}
        if dvals["resolution"] is None:
            raise DatasetConfigError(
                f"{file}: {dwhere}: key 'resolution' is missing; set it in [[datasets]] or [general] "
                "(a positive integer or [width, height])"
            )
        frames = {s.video_frames for s in subsets}
        if len(frames) > 1:
            raise DatasetConfigError(
                f"{file}: {dwhere}: key 'video_frames' differs between its subsets ({sorted(map(str, frames))}); "
                "a batch holds one shape: put clips with another frame count in a separate [[datasets]]"
            )
        _check_buckets(dvals, dwhere, file)
        datasets.append(DatasetConfig(where=f"{file}: {dwhere}", subsets=tuple(subsets), **dvals))
    return DataConfig(datasets=tuple(datasets), source=file)


def _check_buckets(d: dict, where: str, file: str) -> None:
    if d["bucket_reso_steps"] % 8:
        raise DatasetConfigError(
            f"{file}: {where}: key 'bucket_reso_steps' = {d['bucket_reso_steps']} must be a "
            "multiple of 8 (latents are 1/8 of the image)"
        )
    w, h = d["resolution"]
    step = d["bucket_reso_steps"] if d["enable_bucket"] else 8
    if w % step or h % step:
        raise DatasetConfigError(
            f"{file}: {where}: key 'resolution' = {list(d['resolution'])} must be a multiple of {step}"
        )
    if d["enable_bucket"] and not d["bucket_no_upscale"]:
        if d["min_bucket_reso"] > d["max_bucket_reso"]:
            raise DatasetConfigError(
                f"{file}: {where}: key 'min_bucket_reso' ({d['min_bucket_reso']}) must be <= "
                f"'max_bucket_reso' ({d['max_bucket_reso']})"
            )
        if max(w, h) > d["max_bucket_reso"]:
            raise DatasetConfigError(
                f"{file}: {where}: key 'max_bucket_reso' ({d['max_bucket_reso']}) must be >= "
                f"the resolution's width and height {list(d['resolution'])}"
            )


def load_dataset_config(path: str | Path, defaults: Mapping[str, Any] | None = None) -> DataConfig:
    """Read and validate a kohya dataset TOML. Raises DatasetConfigError (names key, file, valid choices)."""
    import toml

    path = Path(path)
    try:
        raw = toml.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetConfigError(f"dataset config file not found: {path}") from None
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise DatasetConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_dataset_config(raw, str(path), defaults)


def write_dataset_config(
    path: str | Path, image_dir: str | Path, resolution: int, batch_size: int, caption_extension: str = ".txt"
) -> str:
    """Write the simplest kohya dataset TOML: one dataset with one subset of ``image_dir``; returns ``path``."""
    Path(path).write_text(
        f'[general]\ncaption_extension = "{caption_extension}"\n\n[[datasets]]\n'
        f"resolution = {resolution}\nbatch_size = {batch_size}\n\n"
        f'  [[datasets.subsets]]\n  image_dir = "{image_dir}"\n'
    )
    return str(path)
