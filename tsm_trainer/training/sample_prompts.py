"""``--sample_prompts`` in sd-scripts' text syntax: one prompt per line, options after `` --``:
``a cat --w 512 --h 512 --d 42 --l 7.5 --s 28``; ``#`` lines and blank lines are skipped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplePrompt:
    prompt: str
    size: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None


_OPTIONS = {"w": "size", "h": "size", "d": "seed", "l": "guidance", "s": "steps"}
_NOT_YET = {
    "n": "negative prompts",
    "ss": "per-prompt samplers",
    "cn": "ControlNet images",
    "am": "attention masks",
    "f": "frame counts",
    "c": "CFG rescale",
    "t": "timestep ranges",
}


def read_sample_prompts(path: str) -> list[SamplePrompt]:
    """Parse the file; ValueError naming the file, line and option for anything not understood."""
    if path.endswith((".toml", ".json")):
        raise ValueError(
            f"--sample_prompts {path}: only the text format (one prompt per line with "
            "--w/--h/--d/--l/--s) is implemented yet"
        )
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--sample_prompts {path}: cannot read it ({e})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--sample_prompts {path} line {number}"
        parts = line.split(" --")
        entry = SamplePrompt(parts[0].strip())
        width = height = None
        for part in parts[1:]:
            key, _, value = part.strip().partition(" ")
            value = value.strip()
            if key in _NOT_YET:
                raise ValueError(f"{where}: --{key} ({_NOT_YET[key]}) is not implemented yet")
            if key not in _OPTIONS:
                raise ValueError(f"{where}: unknown option --{key} (known: --w --h --d --l --s)")
            try:
                number_value = float(value) if key == "l" else int(value)
            except ValueError:
                raise ValueError(f"{where}: --{key} {value!r} is not a number") from None
            if key == "w":
                width = number_value
            elif key == "h":
                height = number_value
            else:
                setattr(entry, _OPTIONS[key], number_value)
        if width is not None and height is not None and width != height:
            raise ValueError(f"{where}: --w {width} --h {height}: only square samples are implemented yet")
        entry.size = width if width is not None else height
        if entry.size is not None and (entry.size < 8 or entry.size % 8):
            raise ValueError(f"{where}: size {entry.size} must be a multiple of 8")
        if entry.steps is not None and entry.steps < 1:
            raise ValueError(f"{where}: --s {entry.steps} must be >= 1")
        if not entry.prompt:
            raise ValueError(f"{where}: empty prompt")
        prompts.append(entry)
    if not prompts:
        raise ValueError(f"--sample_prompts {path}: no prompt in the file")
    return prompts
