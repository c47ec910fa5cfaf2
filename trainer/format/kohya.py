"""The kohya LoRA file: writing it (tensors, metadata, hashes) and reading it safely.

A file holds, per module, `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` and nothing else
(facts.md section 1). Files are read with safetensors only and checked header-first, so a bad upload costs
a clear message and no memory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from trainer.events import JobFailed
from trainer.network.targets import ALL_PREFIXES, Arch, Kind, Target, all_module_targets

if TYPE_CHECKING:
    from trainer.models.base import BaseModel
    from trainer.network.lora import LoraNetwork

SUFFIX_DOWN = ".lora_down.weight"
SUFFIX_UP = ".lora_up.weight"
SUFFIX_ALPHA = ".alpha"
ALLOWED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


class LoraFileError(ValueError):
    """A LoRA file is unusable; the message says what is wrong and what to do."""


# --- tensors in ------------------------------------------------------------------------------------

@dataclass
class LoraModule:
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    kind: Kind

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return delta_weight(self.down, self.up, self.alpha, self.kind)


@dataclass
class KohyaLora:
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    arch: Arch | None = None  # None: could not tell (e.g. tiny test models); check_compatible decides
    source: str = ""

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n, m in self.modules.items():
            out[n + SUFFIX_DOWN] = m.down
            out[n + SUFFIX_UP] = m.up
            out[n + SUFFIX_ALPHA] = torch.tensor(float(m.alpha), dtype=torch.float32)
        return out


def delta_weight(down: torch.Tensor, up: torch.Tensor, alpha: float, kind: Kind | None = None) -> torch.Tensor:
    """dW = (alpha / r) * up @ down in float32, shaped like the target weight.

    Linear -> [out, in]; conv1x1 -> [out, in, 1, 1]; conv3x3 -> [out, in, 3, 3].
    """
    r = down.shape[0]
    d = down.float().flatten(1)
    u = up.float().flatten(1)
    w = (u @ d) * (float(alpha) / r)
    if kind is None:
        kind = "linear" if down.dim() == 2 else ("conv3x3" if down.shape[-1] == 3 else "conv1x1")
    if kind == "linear":
        return w
    if down.dim() == 4:
        return w.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return w.reshape(up.shape[0], down.shape[1], 1, 1)  # a linear-shaped LoRA on a 1x1 conv


# --- writing --------------------------------------------------------------------------------------

def export_state(network: LoraNetwork, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The network's tensors as kohya keys; weights in `dtype`, alpha kept float32 (exact, every loader calls .item())."""
    out: dict[str, torch.Tensor] = {}
    for k, v in network.network_state().items():
        if k.endswith(SUFFIX_ALPHA):
            out[k] = v.detach().to("cpu", torch.float32).reshape(())
        else:
            out[k] = v.detach().to("cpu", dtype).contiguous()
    return out


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


def build_metadata(arch: Arch, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0, *,
                   base_model_name: str, output_name: str, resolution: int | tuple[int, int],
                   training: Mapping[str, Any] | None = None, title: str | None = None,
                   v_parameterization: bool | None = None, train_unet: bool = True,
                   train_text_encoder: bool = False, date: _dt.datetime | None = None,
                   author: str | None = None, description: str | None = None) -> dict[str, str]:
    """kohya `ss_*` and Stability `modelspec.*` metadata, every value a string.

    `training` adds ss_* entries (key given with or without the ss_ prefix; dicts/lists become JSON),
    e.g. {"learning_rate": 1e-4, "max_train_steps": 1000, "seed": 42}.
    `v_parameterization` (SD2 only) picks the 768-v or 512 modelspec architecture; default 768-v.
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(BASE_MODEL_VERSION)}")
    w, h = _format_resolution(resolution)
    v_param = bool(v_parameterization) if v_parameterization is not None else arch == "sd2"
    args: dict[str, str] = {}
    if conv_dim:
        args = {"conv_dim": _num(conv_dim), "conv_alpha": _num(conv_alpha)}
    md: dict[str, str] = {
        "ss_v2": str(arch == "sd2"),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_network_module": "networks.lora",
        "ss_network_dim": _num(dim),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(args),
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

    if arch == "sdxl":
        spec_arch, impl = "stable-diffusion-xl-v1-base", IMPL_STABILITY_AI  # kohya: SDXL LoRAs use SGM names
    elif arch == "sd2":
        spec_arch, impl = ("stable-diffusion-v2-768-v" if v_param else "stable-diffusion-v2-512"), IMPL_DIFFUSERS
    else:
        spec_arch, impl = "stable-diffusion-v1", IMPL_DIFFUSERS
    when = (date or _dt.datetime.now(_dt.UTC)).replace(microsecond=0)
    md.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_arch}/lora",
        "modelspec.implementation": impl,
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


def _data_offset(blob: bytes) -> int:
    (n,) = struct.unpack("<Q", blob[:8])
    return 8 + n


def model_hash_of_bytes(blob: bytes) -> str:
    """sshs_model_hash: sha256 of everything after the safetensors header."""
    return hashlib.sha256(memoryview(blob)[_data_offset(blob):]).hexdigest()


def legacy_hash_of_bytes(blob: bytes) -> str:
    """sshs_legacy_hash (sd-webui-additional-networks): sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    b = io.BytesIO(blob)
    b.seek(0x100000)
    return hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def file_model_hash(path: str | os.PathLike[str]) -> str:
    """sshs_model_hash of a file on disk, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_kohya(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str]) -> str:
    """Write a kohya .safetensors atomically with sshs hashes; returns sshs_model_hash.

    Only `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` keys are accepted.
    """
    path = Path(path)
    bad = [k for k in tensors if not _valid_key(k)]
    if bad:
        raise ValueError(f"not kohya LoRA keys: {bad[:5]}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must be str -> str; {k!r} has {type(v).__name__}")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    md = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    # The data section does not depend on the metadata, so hash a first serialisation and write the second.
    first = st_save(clean, md)
    model_hash = model_hash_of_bytes(first)
    # kohya computes the legacy hash over a file with only the ss_* metadata (user fields must not change it).
    legacy = legacy_hash_of_bytes(st_save(clean, {k: v for k, v in md.items() if k.startswith("ss_")}))
    del first
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=md)
        if file_model_hash(tmp) != model_hash:  # guards against a safetensors change in layout
            raise RuntimeError("sshs_model_hash does not match the written data section")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model_hash


def _valid_key(k: str) -> bool:
    return k.startswith(ALL_PREFIXES) and k.endswith((SUFFIX_DOWN, SUFFIX_UP, SUFFIX_ALPHA)) and \
        "." not in _module_of(k)


def _module_of(k: str) -> str:
    for s in (SUFFIX_DOWN, SUFFIX_UP, SUFFIX_ALPHA):
        if k.endswith(s):
            return k[: -len(s)]
    return k


# --- reading --------------------------------------------------------------------------------------

def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    size = path.stat().st_size
    if size < 8:
        raise LoraFileError(f"{path.name} is {size} bytes: not a safetensors file (empty or truncated upload); "
                            "upload the .safetensors file again")
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            if head[:1] in (b"P", b"\x80") or path.suffix in (".ckpt", ".pt", ".bin"):
                raise LoraFileError(f"{path.name} is not a safetensors file (it looks like a pickled .ckpt/.pt); "
                                    "only .safetensors LoRAs are accepted — convert it to .safetensors first")
            raise LoraFileError(f"{path.name} is not a valid safetensors file or is truncated (header claims "
                                f"{n} bytes, file has {size}); upload the complete .safetensors file again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{path.name} has a damaged safetensors header ({e}); upload the file again") from e
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name} has a damaged safetensors header; upload the file again")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LoraFileError(f"{path.name} has malformed metadata (values must be strings); re-save the file")
    data_len = size - 8 - n
    end = 0
    for k, info in header.items():
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise LoraFileError(f"{path.name}: entry {k!r} in the header is malformed; upload the file again")
        a, b = info["data_offsets"]
        if not (0 <= a <= b):
            raise LoraFileError(f"{path.name}: entry {k!r} has bad offsets; upload the file again")
        end = max(end, b)
    if end > data_len:
        raise LoraFileError(f"{path.name} is truncated: its tensors need {end} bytes of data but only {data_len} are "
                            "there (incomplete download?); upload the complete file again")
    if end < data_len:
        raise LoraFileError(f"{path.name} has {data_len - end} unexpected bytes after its tensors; "
                            "it was not written by a safetensors writer — re-save or re-download it")
    return header, meta, size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A LoRA file's metadata from its checked header alone (no tensor is read). Raises LoraFileError."""
    return _read_header(Path(path))[1]


def _diagnose_foreign(keys: list[str], where: str) -> str | None:
    """A friendly name for common files that are not kohya LoRAs."""
    joined = " ".join(keys[:2000])
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return (f"{where} looks like a full Stable Diffusion checkpoint (a base model), not a LoRA; "
                "use it as a base model instead, or upload the LoRA file")
    if "hada_w1" in joined or "lokr_w1" in joined or ".oft_" in joined:
        return (f"{where} is a LyCORIS LoHa/LoKr/OFT file; only LoRA and LoCon (networks.lora / lycoris locon) files "
                "are supported")
    if "dora_scale" in joined:
        return f"{where} is a DoRA LoRA (has dora_scale); only plain LoRA/LoCon files are supported"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "_lora.down." in k for k in keys):
        return (f"{where} is a diffusers/PEFT-format LoRA (lora_A/lora_B keys), not a kohya file; "
                "convert it to kohya format (or load it in diffusers) first")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param")
           for k in keys):
        return f"{where} looks like a textual-inversion embedding, not a LoRA"
    if any(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in keys):
        return f"{where} looks like a VAE, not a LoRA"
    return None


def _kind_from_shapes(name: str, down: list[int], up: list[int], where: str) -> Kind:
    if len(down) == 2 and len(up) == 2:
        kind: Kind = "linear"
    elif len(down) == 4 and len(up) == 4:
        if up[2:] != [1, 1]:
            raise LoraFileError(f"{where}: {name}.lora_up.weight has kernel {up[2:]}, kohya files use 1x1; "
                                "this file was not written in kohya LoRA format")
        if down[2:] == [1, 1]:
            kind = "conv1x1"
        elif down[2:] == [3, 3]:
            kind = "conv3x3"
        else:
            raise LoraFileError(f"{where}: {name} has an unsupported conv kernel {down[2:]} (only 1x1 and 3x3)")
    else:
        raise LoraFileError(f"{where}: {name} has down shape {down} and up shape {up}, which do not form a LoRA "
                            "(expected [r,in]/[out,r] or [r,in,k,k]/[out,r,1,1])")
    if down[0] != up[1]:
        raise LoraFileError(f"{where}: {name} has mismatched ranks (lora_down rank {down[0]}, lora_up rank {up[1]}); "
                            "the file is damaged or was edited wrongly — re-export it")
    if down[0] == 0:
        raise LoraFileError(f"{where}: {name} has rank 0")
    return kind


def _validate_layout(shapes: Mapping[str, tuple[str, list[int]]], where: str) -> dict[str, Kind]:
    """Check keys/dtypes/pairs/shapes from header info only. Returns module name -> kind."""
    keys = list(shapes)
    if not keys:
        raise LoraFileError(f"{where} contains no tensors; it is not a LoRA")
    foreign = [k for k in keys if not _valid_key(k)]
    if foreign:
        diag = _diagnose_foreign(keys, where)
        if diag:
            raise LoraFileError(diag)
        raise LoraFileError(
            f"{where} has {len(foreign)} tensor(s) that are not kohya LoRA parts, e.g. {', '.join(foreign[:3])}; "
            "a kohya LoRA holds only <lora_unet_|lora_te_|lora_te1_|lora_te2_ name>.lora_down.weight / .lora_up.weight "
            "/ .alpha (A1111 refuses such files too) — remove those tensors or re-export the LoRA")
    bad_dtype = [(k, d) for k, (d, _) in shapes.items() if d not in ALLOWED_DTYPES]
    if bad_dtype:
        k, d = bad_dtype[0]
        raise LoraFileError(f"{where}: tensor {k} has dtype {d}; LoRA tensors must be F16, BF16, F32 or F64")
    names = sorted({_module_of(k) for k in keys})
    kinds: dict[str, Kind] = {}
    for n in names:
        d, u, a = shapes.get(n + SUFFIX_DOWN), shapes.get(n + SUFFIX_UP), shapes.get(n + SUFFIX_ALPHA)
        if d is None or u is None:
            missing = "lora_down.weight" if d is None else "lora_up.weight"
            raise LoraFileError(f"{where}: module {n} has no {missing}; the file is incomplete — re-export it")
        if a is not None and math.prod(a[1]) != 1:
            raise LoraFileError(f"{where}: {n}.alpha has shape {a[1]}; alpha must be a single number")
        kinds[n] = _kind_from_shapes(n, d[1], u[1], where)
    return kinds


def detect_arch(modules: Mapping[str, tuple[list[int], list[int]]], metadata: Mapping[str, str] | None = None,
                ) -> Arch | None:
    """Architecture from names and shapes (module -> (down shape, up shape)); None if it cannot be told."""
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names) or \
            any(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
                for n in names):
        # diffusers writes lora_te1_ for SD1 text encoders: SDXL only if the UNet or TE2 agrees.
        if not any(n.startswith("lora_te2_") for n in names) and not any(
                n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
                for n in names):
            widths = {modules[n][0][1] for n in names if n.endswith("_self_attn_q_proj")}
            if widths & {768, 1024}:
                return "sd1" if 768 in widths else "sd2"
        return "sdxl"
    widths = {modules[n][0][1] for n in names if n.endswith("attn2_to_k")}
    if 2048 in widths:
        return "sdxl"
    if 1024 in widths:
        return "sd2"
    if 768 in widths:
        return "sd1"
    te_widths = {modules[n][0][1] for n in names if n.startswith("lora_te_") and n.endswith("_self_attn_q_proj")}
    if 1024 in te_widths:
        return "sd2"
    if 768 in te_widths:
        return "sd1"
    hint = (metadata or {}).get("ss_base_model_version", "")
    if hint.startswith("sdxl"):
        return "sdxl"
    if hint.startswith("sd_v2"):
        return "sd2"
    if hint.startswith("sd_v1"):
        return "sd1"
    return None


def read_kohya(source: str | os.PathLike[str] | Mapping[str, torch.Tensor], *,
               metadata: Mapping[str, str] | None = None, device: str = "cpu") -> KohyaLora:
    """Read and validate a kohya LoRA (a .safetensors path or an in-memory state dict).

    Missing alpha means alpha = rank (kohya/A1111 behaviour). Raises LoraFileError on anything unusable.
    """
    if isinstance(source, Mapping):
        where = "the LoRA"
        shapes = {k: (_dtype_code(v), list(v.shape)) for k, v in source.items()}
        kinds = _validate_layout(shapes, where)
        tensors: dict[str, torch.Tensor] = dict(source)
        md = dict(metadata or {})
    else:
        path = Path(source)
        where = path.name
        if not path.is_file():
            raise LoraFileError(f"LoRA file {path} does not exist")
        header, md, _ = _read_header(path)
        shapes = {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}
        # Byte counts must agree with dtype and shape before safetensors touches the data.
        for k, (d, shp) in shapes.items():
            if d in ALLOWED_DTYPES:
                a, b = header[k]["data_offsets"]
                if b - a != math.prod(shp) * torch.tensor([], dtype=ALLOWED_DTYPES[d]).element_size():
                    raise LoraFileError(f"{where}: tensor {k} has the wrong byte size for its shape; "
                                        "the file is damaged — upload it again")
        kinds = _validate_layout(shapes, where)
        tensors = {}
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as e:  # safetensors' own checks (overlapping offsets, ...)
            raise LoraFileError(f"{where} could not be read as safetensors ({e}); upload the file again") from e
    modules: dict[str, LoraModule] = {}
    for n, kind in kinds.items():
        down, up = tensors[n + SUFFIX_DOWN], tensors[n + SUFFIX_UP]
        a = tensors.get(n + SUFFIX_ALPHA)
        alpha = float(a.float().reshape(-1)[0]) if a is not None else float(down.shape[0])
        for part, t in (("lora_down.weight", down), ("lora_up.weight", up)):
            if not torch.isfinite(t).all():
                raise LoraFileError(f"{where}: {n}.{part} contains NaN or infinite values (training diverged?); "
                                    "this LoRA cannot be used — retrain with a lower learning rate")
        if not math.isfinite(alpha):
            raise LoraFileError(f"{where}: {n}.alpha is not a finite number; re-export the LoRA")
        modules[n] = LoraModule(n, down, up, alpha, kind)
    arch = detect_arch({n: (list(m.down.shape), list(m.up.shape)) for n, m in modules.items()}, md)
    return KohyaLora(modules=modules, metadata=dict(md), arch=arch, source=where)


def read_kohya_bytes(blob: bytes) -> KohyaLora:
    """Validate in-memory file bytes by the same rules (via a temporary file, so the header checks apply)."""
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return read_kohya(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _dtype_code(t: torch.Tensor) -> str:
    return {v: k for k, v in ALLOWED_DTYPES.items()}.get(t.dtype, str(t.dtype))


def check_compatible(lora: KohyaLora, base: BaseModel) -> dict[str, Target]:
    """Map every module of the LoRA to a module of the base (shape-checked), or raise LoraFileError."""
    base_name = f"{ARCH_NAMES.get(base.arch, base.arch)} base model {base.name!r}"
    if lora.arch is not None and lora.arch != base.arch and {lora.arch, base.arch} != {"sd1", "sd2"}:
        raise LoraFileError(f"{lora.source} is an {ARCH_NAMES[lora.arch]} LoRA but the base is {base_name}; "
                            f"pick an {ARCH_NAMES[lora.arch]} base model or a LoRA made for {ARCH_NAMES[base.arch]}")
    table = all_module_targets(base.unet, base.text_encoders, base.arch)
    unknown = [n for n in lora.modules if n not in table]
    if unknown:
        guess = f" (it looks like an {ARCH_NAMES[lora.arch]} LoRA)" if lora.arch else ""
        raise LoraFileError(
            f"{lora.source}: {len(unknown)} of {len(lora.modules)} modules have no matching layer in the "
            f"{base_name}{guess}, e.g. {', '.join(unknown[:3])}; the LoRA was made for a different architecture — "
            "use a base model of the kind it was trained on")
    out: dict[str, Target] = {}
    used: dict[str, str] = {}
    for n, m in lora.modules.items():
        t = table[n]
        d_in = m.down.shape[1]
        d_out = m.up.shape[0]
        ok_kind = m.kind == t.kind or {m.kind, t.kind} == {"linear", "conv1x1"}
        if not ok_kind or d_in != t.in_features or d_out != t.out_features:
            hint = ""
            if lora.arch in ("sd1", "sd2") and base.arch in ("sd1", "sd2") and lora.arch != base.arch:
                hint = (f" — this is an {ARCH_NAMES[lora.arch]} LoRA and the base is {ARCH_NAMES[base.arch]}; "
                        "pick a matching base model")
            raise LoraFileError(
                f"{lora.source}: {n} is a {m.kind} LoRA {d_in}->{d_out} but the base layer {t.model}.{t.path} is "
                f"{t.kind} {t.in_features}->{t.out_features}{hint or '; the LoRA was made for a different model'}")
        key = f"{t.model}:{t.path}"
        if key in used:
            raise LoraFileError(f"{lora.source}: {n} and {used[key]} both target {t.model}.{t.path} "
                                "(the file mixes two naming schemes); re-export it")
        used[key] = n
        out[n] = t
    return out


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Raw tensors of a (trusted, our own) kohya file, e.g. for resume; use read_kohya for uploads."""
    return st_load(Path(path).read_bytes())


def resolve_lora_path(ref: str, models_dir: Path | None = None) -> Path:
    """A LoRA named in a job spec: a path, or a file name in the models folder (with or without .safetensors)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if models_dir is not None:
        for c in (Path(models_dir) / ref, Path(models_dir) / f"{ref}.safetensors"):
            if c.exists():
                return c
    raise JobFailed(f"LoRA file {ref!r} not found; give a path or a file name in the models folder",
                    reason="bad_input")
