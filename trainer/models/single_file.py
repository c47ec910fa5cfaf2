"""Single-file checkpoints as AUTOMATIC1111 keeps them (original LDM/SGM layout, .safetensors only).

Public API:
- ``load_single_file(path, dtype=torch.float32, prediction_type=None) -> BaseModel``: what ``trainer.models.load.load_base``
  calls for files. Safetensors only: ``.ckpt/.pt/.pth/.bin`` and any pickle/zip (torch.save) content are refused
  unread, since unpickling can run code. The architecture comes from the keys, the config folder from the tensor
  shapes (full-size ``trainer/configs/{sd15,sd2,sdxl}`` first, then the tiny ones); diffusers' own single-file
  converters do the conversion, with our local config folders (so nothing is downloaded).
  ``prediction_type``: SD2 files default to ``v_prediction`` (the shipped sd2 config is SD2.x-768-v); a file's
  ``modelspec.prediction_type`` metadata or SDXL ``v_pred`` marker key wins over the default, and the
  argument (the job spec's ``prediction_type``) wins over both. ``model.extra["prediction_type_source"]`` says which.
- ``save_single_file(model, path, half=False, metadata=None, keep_source_keys=True) -> Path``: the inverse, which
  diffusers does not ship: writes the original layout atomically (``trainer.atomic``). Keys of the model's
  own source file that diffusers does not load (SD2's last OpenCLIP block and ``text_projection``, ``logit_scale``,
  ...) are copied through unchanged; EMA weights are dropped.
- ``read_safetensors_header(path) -> (tensors, metadata)``: the header checked by ``trainer.format.header`` (the
  one parser; no tensor data read), with pickle suffixes refused unread.
- ``detect_arch(keys) -> Arch`` (from ``trainer.format.checkpoint``'s key facts, or a CheckpointError saying what
  the file is instead); ``select_config(arch, tensors) -> Path``.
- ``materialize_tiny_single_file(name) -> Path``: a tiny model as one .safetensors (cached next to its folder).
- Key mapping for merges lives in ``trainer.format.names`` (``checkpoint_key_map``, ``diffusers_to_original_unet_key``...);
  tokenizers in ``trainer.models.tokenizers``.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as dlogging
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from trainer.atomic import folder_atomic, write_with
from trainer.format.checkpoint import (
    CONFIGS_DIR,
    FULL_CONFIGS,
    TEXT_ENCODER_PREFIXES,
    TINY_CONFIGS,
    TOY_BASES,
    UNET_PREFIX,
    VAE_PREFIX,
    checkpoint_arch,
    describe_non_checkpoint,
)
from trainer.format.header import (
    ARCH_NAMES,
    PICKLE_SUFFIXES,
    Arch,
    HeaderError,
    pickle_refusal,
    read_file_header,
)
from trainer.format.metadata import spec_architecture
from trainer.format.names import to_original_state_dict, unet_key_map
from trainer.models.base import BaseModel, ModelError, cache_root, load_diffusers_folder
from trainer.models.builtin import config_hash, tiny_model_dir
from trainer.models.tokenizers import tokenizers_for

_COMPONENT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")


class CheckpointError(ModelError):
    """A single-file checkpoint was refused; the message says why and what to do."""


# --- reading safely ----------------------------------------------------------------------------

def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table and metadata of a .safetensors file, after checking it is one (never unpickles)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(pickle_refusal(path.name, f"a pickle-based checkpoint ({path.suffix})"))
    try:
        header, metadata, _ = read_file_header(path)
    except HeaderError as e:
        raise CheckpointError(str(e)) from None
    return header, metadata


# --- telling what a file is --------------------------------------------------------------------

def detect_arch(keys: list[str] | set[str]) -> Arch:
    """SD1.x / SD2.x / SDXL from the original-layout key names, or a CheckpointError saying what the file is."""
    ks = set(keys)
    arch = checkpoint_arch(ks)
    if arch is None or UNET_PREFIX + "input_blocks.0.0.weight" not in ks:
        raise CheckpointError(f"this is not a Stable Diffusion checkpoint (it looks like {describe_non_checkpoint(ks)})")
    if not any(k.startswith(VAE_PREFIX) for k in ks):
        raise CheckpointError(f"this {ARCH_NAMES[arch]} checkpoint has no VAE (first_stage_model.*); "
                              "bake a VAE into it (e.g. with A1111's checkpoint merger) or use a diffusers folder")
    return arch


def _shape(tensors: dict[str, dict], key: str) -> tuple[int, ...] | None:
    info = tensors.get(key)
    return tuple(info["shape"]) if info else None


def _widths(tensors: dict[str, dict]) -> dict[str, int | None]:
    """Context dim (attn2.to_k input width) and model channels / in channels (input_blocks.0.0.weight)."""
    conv_in = _shape(tensors, UNET_PREFIX + "input_blocks.0.0.weight")
    ctx = next((s[-1] for k, v in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
                for s in [tuple(v["shape"])]), None)
    return {"context_dim": ctx, "model_channels": conv_in[0] if conv_in else None,
            "in_channels": conv_in[1] if conv_in else None}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=8)
def _expected_unet_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Original key -> shape for this config's UNet (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_json(config_dir / "unet" / "config.json"))
    shapes = {n: tuple(p.shape) for n, p in unet.state_dict().items()}
    return {ok.key: shapes[name] for name, ok in unet_key_map(unet).items()}


def _unet_mismatches(config_dir: Path, tensors: dict[str, dict]) -> list[str]:
    """Original UNet keys whose shape in the file differs from what this config needs."""
    bad = []
    for key, want in _expected_unet_shapes(config_dir).items():
        got = _shape(tensors, key)
        if got != want:
            bad.append(f"{key}: file {list(got) if got else 'missing'}, config {list(want)}")
    return bad


def select_config(arch: Arch, tensors: dict[str, dict], named: str | None = None) -> Path:
    """The shipped config folder whose UNet matches the file's shapes exactly (full-size first, then tiny).
    ``named``: a toy base's own config (its ``loraforge.config`` metadata), tried first: the toy bases share the
    tiny UNet layouts but not their VAE's normalisation, which no tensor shape tells."""
    w = _widths(tensors)
    if w["in_channels"] not in (None, 4):
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(w["in_channels"] or 0, "a non-standard")
        raise CheckpointError(f"this is {kind} {ARCH_NAMES[arch]} checkpoint (UNet takes {w['in_channels']} input "
                              "channels); LoRA training needs a standard text-to-image base model")
    tried = []
    own = [named] if named in TOY_BASES and TOY_BASES[named] == arch else []
    for name in (*own, FULL_CONFIGS[arch], TINY_CONFIGS[arch]):
        folder = CONFIGS_DIR / name
        cfg = _json(folder / "unet" / "config.json")
        widths = (cfg["cross_attention_dim"], cfg["block_out_channels"][0])
        if widths != (w["context_dim"], w["model_channels"]):  # cheap check first; the full one builds a UNet
            tried.append(f"{name}: context dim {widths[0]}, model channels {widths[1]}")
            continue
        bad = _unet_mismatches(folder, tensors)
        if not bad:
            return folder
        tried.append(f"{name}: {len(bad)} mismatched tensors, e.g. {bad[0]}")
    raise CheckpointError(
        f"this {ARCH_NAMES[arch]} checkpoint (context dim {w['context_dim']}, model channels {w['model_channels']}) "
        f"does not match the {ARCH_NAMES[arch]} layouts loraforge knows ({'; '.join(tried)}); "
        "only the standard base architectures (SD1.5, SD2.x-768, SDXL base) are supported"
    )


# --- loading -----------------------------------------------------------------------------------

def _te_vocab_rows(tensors: dict[str, dict], prefix: str, openclip: bool) -> int | None:
    key = prefix + ("token_embedding.weight" if openclip else "embeddings.token_embedding.weight")
    s = _shape(tensors, key)
    return s[0] if s else None


def _effective_config_dir(config_dir: Path, arch: Arch, tensors: dict[str, dict]) -> Path:
    """The config folder itself, or a cached copy whose text-encoder vocab sizes match the file (tiny configs
    leave vocab_size to the tokenizer that is built locally)."""
    patch: dict[str, int] = {}
    for idx, (prefix, openclip) in enumerate(TEXT_ENCODER_PREFIXES[arch]):
        sub = "text_encoder" if idx == 0 else f"text_encoder_{idx + 1}"
        cfg = _json(config_dir / sub / "config.json")
        rows = _te_vocab_rows(tensors, prefix, openclip)
        if rows is None:
            raise CheckpointError(f"this {ARCH_NAMES[arch]} checkpoint has no text-encoder token embedding "
                                  f"({prefix}...); it is incomplete")
        hidden = _shape(tensors, prefix + ("token_embedding.weight" if openclip else "embeddings.token_embedding.weight"))
        if hidden and hidden[1] != cfg["hidden_size"]:
            raise CheckpointError(f"text encoder {idx + 1} of this checkpoint is {hidden[1]} wide; the "
                                  f"{config_dir.name} layout needs {cfg['hidden_size']}")
        if cfg.get("vocab_size") != rows:
            patch[sub] = rows
    if not patch:
        return config_dir
    tag = "-".join(f"{k}{v}" for k, v in sorted(patch.items()))
    # The content hash too: a shipped config that changes (a new release) must not reuse the old copy.
    dest = cache_root() / "single-file-configs" / f"{config_dir.name}-{config_hash(config_dir)}-{tag}"
    if (dest / "model_index.json").exists():
        return dest
    with folder_atomic(dest, replace=False) as tmp:  # a concurrent loader's identical copy may win
        shutil.copytree(config_dir, tmp, dirs_exist_ok=True)
        for sub, rows in patch.items():
            cfg = _json(tmp / sub / "config.json")
            cfg["vocab_size"] = rows
            if cfg.get("bos_token_id", 0) >= rows or cfg.get("eos_token_id", 0) >= rows:
                cfg["bos_token_id"], cfg["eos_token_id"] = rows - 2, rows - 1  # specials close the vocabulary
            cfg["pad_token_id"] = min(cfg.get("pad_token_id", 0), rows - 1)
            (tmp / sub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dest


def _prediction_type(arch: Arch, metadata: dict[str, str], tensors: dict[str, dict], default: str,
                     override: str | None) -> tuple[str, str]:
    if override:
        return override, "argument"
    md = metadata.get("modelspec.prediction_type", "").strip().lower()
    if md in ("v", "v_prediction", "v-prediction", "velocity"):
        return "v_prediction", "metadata"
    if md in ("epsilon", "eps"):
        return "epsilon", "metadata"
    if "v_pred" in tensors:  # the SDXL v-prediction marker ComfyUI and A1111 read
        return "v_prediction", "metadata"
    archspec = metadata.get("modelspec.architecture", "")
    if archspec.startswith("stable-diffusion-v2-512"):
        return "epsilon", "metadata"
    return default, "config default"


def _no_meta(model: torch.nn.Module, what: str) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} {what} weights (e.g. {missing[0]}); it is incomplete")


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None) -> BaseModel:
    """Load an A1111-style single-file .safetensors checkpoint offline (see the module doc)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    path = Path(path)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise CheckpointError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    tensors, metadata = read_safetensors_header(path)
    arch = detect_arch(list(tensors))
    config_dir = select_config(arch, tensors, metadata.get("loraforge.config"))
    folder = _effective_config_dir(config_dir, arch, tensors)
    # Read the tensors ourselves with safetensors: diffusers' path loader would torch.load (unpickle) any file
    # whose name does not end in .safetensors.
    # Only the components' tensors: EMA copies and the like would double the memory for nothing.
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(_COMPONENT_PREFIXES)}
    kw = {"config": str(folder), "local_files_only": True, "torch_dtype": dtype}
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers warns about every unused key (EMA, position_ids...) and dtype casts
    try:
        unet = UNet2DConditionModel.from_single_file(sd, subfolder="unet", **kw)
        vae = AutoencoderKL.from_single_file(sd, subfolder="vae", **kw)
        tes: list = [create_diffusers_clip_model_from_ldm(CLIPTextModel, sd, subfolder="text_encoder", config=str(folder),
                                                          torch_dtype=dtype, local_files_only=True)]
        if arch == "sdxl":
            tes.append(create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, sd, subfolder="text_encoder_2",
                                                            config=str(folder), torch_dtype=dtype,
                                                            local_files_only=True))
    except CheckpointError:
        raise
    except Exception as e:  # diffusers' own errors are long and name internals: say what failed, keep the cause
        raise CheckpointError(f"could not load {path.name} as an {ARCH_NAMES[arch]} checkpoint: {e}") from e
    finally:
        dlogging.set_verbosity(verbosity)
        del sd
    for m, what in [(unet, "UNet"), (vae, "VAE"), *((t, "text encoder") for t in tes)]:
        _no_meta(m, what)
        m.requires_grad_(False)
        m.eval()
    default_pt = str(_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon"))
    pt, pt_source = _prediction_type(arch, metadata, tensors, default_pt, prediction_type)
    sched = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True, prediction_type=pt)
    return BaseModel(arch=arch, name=path.stem, unet=unet, vae=vae, text_encoders=tes,
                     tokenizers=tokenizers_for(arch, config_dir.name), noise_scheduler=sched, source=path,
                     config_dir=folder,
                     extra={"prediction_type_source": pt_source, "metadata": metadata, "config": config_dir.name})


# --- saving ------------------------------------------------------------------------------------

def _default_metadata(model: BaseModel) -> dict[str, str]:
    v = model.prediction_type == "v_prediction"
    arch = spec_architecture(model.arch, v)
    impl = ("https://github.com/Stability-AI/generative-models" if model.arch == "sdxl"
            else "https://github.com/Stability-AI/stablediffusion")
    size = int(model.vae.config.sample_size)
    md = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.implementation": impl,
          "modelspec.title": model.name, "modelspec.resolution": f"{size}x{size}",
          "modelspec.prediction_type": "v" if v else "epsilon"}
    config = model.extra.get("config") or Path(model.config_dir).name
    if config in TOY_BASES:  # no tensor shape tells a toy layout: a merge of a toy base must say it still
        md["loraforge.config"] = config
    return md


def save_single_file(model: BaseModel, path: str | Path, half: bool = False, metadata: dict[str, str] | None = None,
                     keep_source_keys: bool = True) -> Path:
    """Write ``model`` as an A1111-style single-file checkpoint (original layout), atomically."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"checkpoints are written as .safetensors only, not {path.name}")
    dtype = torch.float16 if half else None
    sd = to_original_state_dict(model, dtype=dtype)
    src = Path(model.source)
    if keep_source_keys and src.is_file() and src.suffix.lower() == ".safetensors":
        # Keys diffusers does not load (SD2's last OpenCLIP block, text_projection, logit_scale...) are kept so the
        # file stays complete for tools that expect them; EMA copies would be stale, so they are dropped.
        read_safetensors_header(src)  # refuse a source that is not a real safetensors file
        with safe_open(str(src), framework="pt") as f:
            for k in f.keys():
                if k in sd or k.startswith("model_ema.") or k == "v_pred":
                    continue
                t = f.get_tensor(k)
                sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if model.arch == "sdxl" and model.prediction_type == "v_prediction":
        sd["v_pred"] = torch.tensor([])  # marker other tools read to pick v-prediction for SDXL
    md = _default_metadata(model)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"safetensors metadata must be str -> str; {k!r} has a {type(v).__name__} value")
        md[k] = v
    return write_with(path, lambda tmp: save_file(sd, str(tmp), metadata=md))


def materialize_tiny_single_file(name: str) -> Path:
    """A built-in tiny model as one A1111-style .safetensors, written once next to its diffusers folder."""
    folder = tiny_model_dir(name)
    out = folder.parent / f"{folder.name}.safetensors"
    if not out.exists():
        save_single_file(load_diffusers_folder(folder, name=name), out)
    return out
