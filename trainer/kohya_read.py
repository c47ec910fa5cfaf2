"""Reading kohya sd-scripts settings: a training config (``--config_file`` TOML, flat or in sections; a kohya_ss GUI
JSON), a dataset config (``[general]`` / ``[[datasets]]``), or an ``accelerate launch train_network.py --...`` command
line saved in a .txt/.sh/.bat -> one flat dict of kohya argument names (trainer.kohya_import translates it).

Torch-free (the bot reads attached files with it).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

from trainer.spec import SpecError, load_toml_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Keys whose presence tells a kohya file from a job file (no job-file field has these names).
MARKERS = {"network_dim", "network_alpha", "network_module", "pretrained_model_name_or_path", "train_data_dir",
           "learning_rate", "optimizer_type", "max_train_steps", "max_train_epochs", "train_batch_size",
           "datasets", "general", "model_arguments", "training_arguments", "dataset_config", "output_dir"}


class KohyaImportError(ValueError):
    """Not a kohya config, or nothing in it could be read; the message says what to do."""


def looks_like_kohya(values: dict[str, Any]) -> bool:
    return bool(MARKERS & set(values))


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """A --config_file TOML: sections are merged into one level, as sd-scripts' read_config_from_file does."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and k not in ("general",):
            out.update(v)
        else:
            out[k] = v
    return out


def parse_command_line(text: str) -> dict[str, Any]:
    """The ``--key=value`` / ``--key value ...`` / ``--flag`` arguments after the training script's name."""
    text = re.sub(r"[\\^`][ \t]*\r?\n", " ", text)  # sh, cmd and PowerShell line continuations
    text = text.replace("\\", "\\\\")  # Windows paths keep their backslashes through the POSIX split
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = list(lex)
    start = next((i + 1 for i, t in enumerate(tokens) if t.endswith(".py")), None)
    if start is None:
        raise KohyaImportError("no training script (train_network.py, sdxl_train_network.py ...) in the command line")
    args: dict[str, Any] = {}
    key: str | None = None
    for tok in tokens[start:]:
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            key = name.replace("-", "_")
            args[key] = value if eq else True
            if eq:
                key = None if key != "network_args" and key != "optimizer_args" else key
        elif key is not None:
            prev = args[key]
            args[key] = tok if prev is True else ([*prev, tok] if isinstance(prev, list) else [prev, tok])
        elif tok in ("&&", ";", "|"):
            break
    for k in ("network_args", "optimizer_args"):
        if isinstance(args.get(k), str):
            args[k] = [args[k]]
    return args


def read_kohya_file(path: Path) -> dict[str, Any]:
    """A kohya file's settings as one flat dict (a dataset config keeps its general/datasets keys)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KohyaImportError(f"{path} is not a text file") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KohyaImportError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise KohyaImportError(f"{path}: expected a JSON object of settings")
        return flatten(data)
    if path.suffix.lower() == ".toml":
        try:
            return flatten(load_toml_text(text, source=str(path)))
        except SpecError as e:
            raise KohyaImportError(str(e)) from None
    return parse_command_line(text)


def read_kohya_text(name: str, text: str) -> dict[str, Any]:
    """Like read_kohya_file, for a file's text (an attachment): TOML/JSON by its name, else a command line."""
    suffix = Path(name).suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise KohyaImportError("expected a JSON object of settings")
            return flatten(data)
        if suffix == ".toml":
            return flatten(tomllib.loads(text))
        return parse_command_line(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise KohyaImportError(f"it cannot be read ({e})") from None


def is_kohya_text(name: str, text: str) -> bool:
    """Whether an attached file is kohya's rather than a job file: a command line, a JSON, or a TOML with kohya keys."""
    suffix = Path(name).suffix.lower()
    if suffix != ".toml":
        return suffix in (".json", ".txt", ".sh", ".bat", ".cmd", ".ps1") or "train_network.py" in text
    try:
        return looks_like_kohya(flatten(tomllib.loads(text)))
    except tomllib.TOMLDecodeError:
        return False


def resolution_side(v: Any) -> tuple[int, str]:
    """kohya's resolution (512, "512", "512,512", [768, 512]) -> a side for the engine, and a note if not square."""
    if isinstance(v, int | float):
        return int(v), ""
    parts = [int(float(p)) for p in (v if isinstance(v, list) else str(v).split(","))]
    if len(parts) == 1 or parts[0] == parts[1]:
        return parts[0], ""
    side = int(round(math.sqrt(parts[0] * parts[1]) / 8)) * 8
    return side, f"{parts[0]}x{parts[1]} trains at {side} px squares of the same area (buckets: data.bucketing)"


def count_images(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError:
        return 0


def concepts_from_train_data_dir(root: Path) -> list[dict[str, Any]]:
    """kohya's DreamBooth folders: ``<N>_<words>`` subfolders, N repeats, the words the prompt of uncaptioned images."""
    out = []
    if not root.is_dir():
        return out
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = re.match(r"^(\d+)_(.*)$", sub.name)
        if m:
            out.append({"image_dir": str(sub), "repeats": max(1, int(m.group(1))),
                        "instance_prompt": m.group(2).strip(), "caption_mode": "caption_only"})
    return out


def num(v: Any) -> float | int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return v
    try:
        f = float(str(v).strip().strip("\"'"))
    except ValueError:
        return None
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def truthy(v: Any) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


SAMPLE_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                  "l": ("cfg", float), "s": ("steps", int)}


def read_sample_prompts(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """kohya's --sample_prompts text file: one prompt a line with ``--n negative --w 512 --h 512 --d seed --l cfg
    --s steps``. Returns (the [[sample.prompts]] values, the options that have no equivalent)."""
    prompts: list[dict[str, Any]] = []
    left: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text, *options = re.split(r"\s+--(?=\w\b)", " " + line)
        prompt: dict[str, Any] = {"prompt": text.strip()}
        for opt in options:
            key, _, value = opt.partition(" ")
            if key in SAMPLE_OPTIONS and value.strip():
                name, conv = SAMPLE_OPTIONS[key]
                try:
                    prompt[name] = conv(value.strip())
                except ValueError:
                    left.append(f"--{opt}")
            else:
                left.append(f"--{opt}")
        for side in ("width", "height"):  # the engine renders multiples of 8 from 64 px
            if side in prompt:
                prompt[side] = max(64, prompt[side] // 8 * 8)
        prompts.append(prompt)
    return prompts, left
