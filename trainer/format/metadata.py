"""kohya LoRA metadata (``ss_*`` and Stability's ``modelspec.*``, every value a string) and the sshs hashes.

A1111 reads ``ss_base_model_version`` to tell SDXL from SD1, ``ss_output_name`` as the prompt alias, and trusts
``sshs_model_hash`` (sha256 of the bytes after the safetensors header): see facts.md section 1.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from collections.abc import Mapping
from typing import Any

from trainer.format.header import Arch, header_length

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


def _format_resolution(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


def _as_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def spec_architecture(arch: Arch, v_prediction: bool | None = None) -> str:
    """Stability's ``modelspec.architecture`` of a base model (a LoRA appends ``/lora``); SD2 defaults to 768-v."""
    if arch == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if arch == "sd2":
        return "stable-diffusion-v2-768-v" if v_prediction or v_prediction is None else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


# What sd-scripts records for a LyCORIS network (`--network_module lycoris.kohya --network_args algo=...`):
# the args as the user's strings; DoRA is algo lora with dora_wd, here on the input axis (what A1111 reads).
LYCORIS_ARGS: dict[str, dict[str, str]] = {
    "loha": {"algo": "loha"}, "lokr": {"algo": "lokr"},
    "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"},
}


def network_metadata(arch: Arch, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0,
                     network_args: Mapping[str, float | str] | None = None,
                     network_type: str = "lora") -> dict[str, str]:
    """The ``ss_*`` fields every loader reads to apply a LoRA: base model version, network module, dims, args.
    network_args: further kohya network args (rank_dropout, module_dropout; LyCORIS' preset), written as kohya does
    (strings; zero numbers and empty strings left out).
    network_type loha/lokr/dora: ss_network_module "lycoris.kohya" with LyCORIS' algo args."""
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(BASE_MODEL_VERSION)}")
    if network_type != "lora" and network_type not in LYCORIS_ARGS:
        raise ValueError(f"unknown network type {network_type!r}")
    args = dict(LYCORIS_ARGS.get(network_type, {}))
    if conv_dim:
        args.update({"conv_dim": _num(conv_dim), "conv_alpha": _num(conv_alpha)})
    args.update({k: v if isinstance(v, str) else _num(v) for k, v in (network_args or {}).items() if v})
    return {
        "ss_v2": str(arch == "sd2"),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_network_module": "lycoris.kohya" if network_type != "lora" else "networks.lora",
        "ss_network_dim": _num(dim),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(args),
    }


def build_metadata(arch: Arch, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0, *,
                   base_model_name: str, output_name: str, resolution: int | tuple[int, int],
                   training: Mapping[str, Any] | None = None, title: str | None = None,
                   v_parameterization: bool | None = None, train_unet: bool = True,
                   train_text_encoder: bool = False, date: _dt.datetime | None = None,
                   author: str | None = None, description: str | None = None,
                   network_args: Mapping[str, float | str] | None = None,
                   network_type: str = "lora") -> dict[str, str]:
    """kohya `ss_*` and Stability `modelspec.*` metadata, every value a string.

    `training` adds ss_* entries (key given with or without the ss_ prefix; dicts/lists become JSON),
    e.g. {"learning_rate": 1e-4, "max_train_steps": 1000, "seed": 42}.
    `v_parameterization` (SD2 only) picks the 768-v or 512 modelspec architecture; default 768-v.
    """
    w, h = _format_resolution(resolution)
    v_param = bool(v_parameterization) if v_parameterization is not None else arch == "sd2"
    md: dict[str, str] = {
        **network_metadata(arch, dim, alpha, conv_dim, conv_alpha, network_args, network_type),
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model_name,
        "ss_resolution": f"({w}, {h})",
        "ss_network_train_unet_only": str(train_unet and not train_text_encoder),
        "ss_network_train_text_encoder_only": str(train_text_encoder and not train_unet),
    }
    if arch == "sd2":
        md["ss_v_parameterization"] = str(v_param)
    for k, v in (training or {}).items():
        if v is None:
            continue
        md[k if k.startswith("ss_") else f"ss_{k}"] = _as_str(v)

    when = (date or _dt.datetime.now(_dt.UTC)).replace(microsecond=0)
    md.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_architecture(arch, v_param)}/lora",
        # kohya: SDXL LoRAs use SGM names (Stability's implementation), SD1/SD2 LoRAs diffusers names
        "modelspec.implementation": IMPL_STABILITY_AI if arch == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": when.isoformat(),
    })
    if author:
        md["modelspec.author"] = author
    if description:
        md["modelspec.description"] = description
    return md


def _num(v: float | int) -> str:
    """4 -> "4", 4.0 -> "4", 0.5 -> "0.5" (kohya writes ints for whole values)."""
    f = float(v)
    return str(int(f)) if f.is_integer() else repr(f)


def model_hash_of_bytes(blob: bytes) -> str:
    """sshs_model_hash: sha256 of everything after the safetensors header."""
    return hashlib.sha256(memoryview(blob)[8 + header_length(blob):]).hexdigest()


def legacy_hash_of_bytes(blob: bytes) -> str:
    """sshs_legacy_hash (sd-webui-additional-networks): sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    b = io.BytesIO(blob)
    b.seek(0x100000)
    return hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def file_model_hash(path: str | os.PathLike[str]) -> str:
    """sshs_model_hash of a file on disk, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + header_length(f.read(8)))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
