"""Which modules a LoRA trains, what kohya calls them, which block each one sits in, and which base module
each module of a LoRA file fits (``check_compatible``).

Everything here reads module attributes only (no weights), so it works on meta-device models too.
Names follow kohya sd-scripts (see facts.md section 1): SD1/SD2 UNet names are diffusers paths,
SDXL UNet names are the original SGM paths, text-encoder names always carry `text_model_`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from trainer.format.header import ARCH_NAMES, Arch, Kind
from trainer.format.kohya import KohyaLora, LoraFileError
from trainer.format.names import diffusers_to_original_unet_key, unet_layout

if TYPE_CHECKING:
    from trainer.models.base import BaseModel

ModelKey = Literal["unet", "te1", "te2"]

# kohya's LoRA: every Linear / 1x1 conv inside the transformer blocks, and these text-encoder layers.
UNET_LINEAR_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# unet_modules = "attention": the attention projections only (what diffusers' LoRA examples train)
UNET_ATTENTION_SUFFIXES = UNET_LINEAR_SUFFIXES[:4]
UnetModules = Literal["transformer", "attention"]
TE_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# LoCon adds the resnets, downsamplers and upsamplers (never conv_in / conv_out / time embedding).
UNET_CONV_SUFFIXES = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")

PREFIX_UNET = "lora_unet_"
TE_PREFIXES: dict[str, tuple[str, ...]] = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}


@dataclass(frozen=True)
class Target:
    """One module a LoRA can attach to."""

    model: ModelKey          # which model it lives in
    path: str                # module path in that diffusers/transformers model
    kind: Kind
    in_features: int
    out_features: int
    kohya_name: str          # e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    block: str               # BASE, IN00.., MID, OUT00..
    aliases: tuple[str, ...] = ()  # other names seen in the wild for the same module (diffusers-named SDXL, no text_model_)

    @property
    def uses_conv_dim(self) -> bool:
        """3x3 convs take conv_dim/conv_alpha; everything else the linear dim/alpha (kohya's rule)."""
        return self.kind == "conv3x3"

    def down_shape(self, rank: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (rank, self.in_features)
        k = 3 if self.kind == "conv3x3" else 1
        return (rank, self.in_features, k, k)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, rank)
        return (self.out_features, rank, 1, 1)


# --- block slots ---------------------------------------------------------------------------------

def block_slots(arch: Arch) -> list[str]:
    """All block slot names of an architecture, in kohya/SuperMerger order."""
    n = 9 if arch == "sdxl" else 12
    return ["BASE", *(f"IN{i:02d}" for i in range(n)), "MID", *(f"OUT{i:02d}" for i in range(n))]


def _norm_slot(token: str) -> str:
    t = token.strip().upper()
    m = re.fullmatch(r"(IN|OUT)(\d{1,2})", t)
    return f"{m.group(1)}{int(m.group(2)):02d}" if m else t


def parse_blocks(spec: str | Sequence[str] | None, arch: Arch) -> list[str] | None:
    """Parse "OUT03-OUT05,MID" (ranges and lists, case-insensitive) into slot names in canonical order.

    None or an empty spec means "all blocks" and returns None.
    """
    if spec is None:
        return None
    tokens = [t for part in ([spec] if isinstance(spec, str) else spec) for t in str(part).split(",")]
    tokens = [t.strip() for t in tokens if t.strip()]
    if not tokens:
        return None
    slots = block_slots(arch)
    index = {s: i for i, s in enumerate(slots)}
    chosen: set[str] = set()

    def check(name: str, raw: str) -> int:
        if name not in index:
            raise ValueError(
                f"unknown block {raw.strip()!r} for {arch}; valid blocks are {', '.join(slots)} "
                f"(ranges like OUT03-OUT05 and lists like IN04,MID are accepted)")
        return index[name]

    for tok in tokens:
        if "-" in tok:
            a, _, b = tok.partition("-")
            ia, ib = check(_norm_slot(a), a), check(_norm_slot(b), b)
            if ia > ib:
                raise ValueError(f"block range {tok!r} runs backwards; write it as {slots[ib]}-{slots[ia]}")
            chosen.update(slots[ia:ib + 1])
        else:
            chosen.add(slots[check(_norm_slot(tok), tok)])
    return [s for s in slots if s in chosen]


# --- naming ------------------------------------------------------------------------------------

def sgm_path(path: str, layout: tuple[int, Sequence[bool]] | None) -> str | None:
    """The SGM (original) module path of a diffusers UNet module path, by the one table in
    ``trainer.format.names``; None when it has none (or the UNet's layout is not SD's)."""
    if layout is None:
        return None
    try:
        return diffusers_to_original_unet_key(path, layout[0], layout[1], prefix="")
    except (KeyError, ValueError, IndexError):
        return None


def te_kohya_path(path: str) -> str:
    """transformers 5 CLIPTextModel paths lack `text_model.`, CLIPTextModelWithProjection's have it."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _kind_of(module: nn.Module) -> tuple[Kind, int, int] | None:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        ks = tuple(module.kernel_size)
        if ks == (1, 1):
            return "conv1x1", module.in_channels, module.out_channels
        if ks == (3, 3):
            return "conv3x3", module.in_channels, module.out_channels
    return None


def _iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Linear/Conv2d modules by path; a peft-wrapped module counts as its base layer."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        BaseTunerLayer = ()  # type: ignore[assignment]
    for name, mod in model.named_modules():
        if ".base_layer" in name or ".lora_" in name:
            continue
        if BaseTunerLayer and isinstance(mod, BaseTunerLayer):
            mod = mod.get_base_layer()
        yield name, mod


def _unet_selected(path: str, conv: bool, modules: UnetModules = "transformer") -> bool:
    linear = UNET_ATTENTION_SUFFIXES if modules == "attention" else UNET_LINEAR_SUFFIXES
    if ".attentions." in path and any(path.endswith("." + s) for s in linear):
        return True
    if conv:
        if ".resnets." in path and any(path.endswith("." + s) for s in UNET_CONV_SUFFIXES[:4]):
            return True
        if any(path.endswith("." + s) for s in UNET_CONV_SUFFIXES[4:]):
            return True
    return False


def _te_selected(path: str) -> bool:
    return ".layers." in path and any(path.endswith("." + s) for s in TE_SUFFIXES)


def _unet_target(path: str, mod: nn.Module, arch: Arch, layout: tuple[int, list[bool]] | None) -> Target | None:
    k = _kind_of(mod)
    if k is None:
        return None
    kind, fin, fout = k
    sgm = sgm_path(path, layout)
    diffusers_name = PREFIX_UNET + path.replace(".", "_")
    sgm_name = PREFIX_UNET + sgm.replace(".", "_") if sgm is not None else None
    if arch == "sdxl" and sgm_name is not None:
        name, aliases = sgm_name, (diffusers_name,)
    else:
        name, aliases = diffusers_name, ()
    # Outside the blocks: conv_in is input_blocks.0 (IN00), conv_out ends the last output block;
    # the time/label embeddings belong to no block and are counted with BASE.
    block = block_of_kohya_name(sgm_name, arch, layout[0]) if sgm_name is not None and layout else "BASE"
    return Target("unet", path, kind, fin, fout, name, block, aliases)


def _te_target(path: str, mod: nn.Module, arch: Arch, te_index: int) -> Target | None:
    k = _kind_of(mod)
    if k is None:
        return None
    kind, fin, fout = k
    prefix = TE_PREFIXES[arch][te_index]
    kp = te_kohya_path(path).replace(".", "_")
    bare = kp[len("text_model_"):]
    aliases = [prefix + bare]  # transformers-5 names without text_model_ (only diffusers loads those)
    if arch != "sdxl":
        aliases.append("lora_te1_" + kp)  # diffusers' convert_state_dict_to_kohya writes lora_te1_ for SD1
    return Target("te1" if te_index == 0 else "te2", path, kind, fin, fout, prefix + kp, "BASE", tuple(aliases))


def lora_targets(unet: nn.Module | None, text_encoders: Sequence[nn.Module], arch: Arch, conv: bool,
                 train_unet: bool = True, train_te: bool = False,
                 blocks: Sequence[str] | str | None = None, unet_modules: UnetModules = "transformer") -> list[Target]:
    """Exactly kohya's module set for these models (`unet_modules="attention"`: of the transformer blocks' linear
    layers only the attention projections q/k/v/out; LoCon's convs are unaffected).

    `blocks` (slot names or a spec string for parse_blocks) keeps only modules in those blocks;
    BASE stands for the text encoder(s), so a block list without BASE trains no text encoder.
    """
    chosen = parse_blocks(blocks, arch)
    out: list[Target] = []
    if train_te:
        if len(text_encoders) != (2 if arch == "sdxl" else 1):
            raise ValueError(f"{arch} expects {2 if arch == 'sdxl' else 1} text encoder(s), got {len(text_encoders)}")
        for ti, te in enumerate(text_encoders):
            for path, mod in _iter_layers(te):
                if _te_selected(path):
                    t = _te_target(path, mod, arch, ti)
                    if t is not None:
                        out.append(t)
    if train_unet and unet is not None:
        layout = _unet_layout(unet)
        for path, mod in _iter_layers(unet):
            if _unet_selected(path, conv, unet_modules):
                t = _unet_target(path, mod, arch, layout)
                if t is not None:
                    out.append(t)
    if chosen is not None:
        keep = set(chosen)
        out = [t for t in out if t.block in keep]
    return out


def _unet_layout(unet: nn.Module) -> tuple[int, list[bool]] | None:
    try:
        return unet_layout(unet)
    except (AttributeError, ValueError):  # not a diffusers UNet with one layers_per_block: diffusers names only
        return None


def all_module_targets(unet: nn.Module | None, text_encoders: Sequence[nn.Module], arch: Arch) -> dict[str, Target]:
    """Every Linear/1x1/3x3 conv of the base by kohya name AND alias: for loading files from any trainer."""
    out: dict[str, Target] = {}
    for ti, te in enumerate(text_encoders):
        for path, mod in _iter_layers(te):
            t = _te_target(path, mod, arch, ti)
            if t is not None:
                _register(out, t)
    if unet is not None:
        layout = _unet_layout(unet)
        for path, mod in _iter_layers(unet):
            t = _unet_target(path, mod, arch, layout)
            if t is not None:
                _register(out, t)
    return out


def _register(out: dict[str, Target], t: Target) -> None:
    out[t.kohya_name] = t
    for a in t.aliases:
        out.setdefault(a, t)  # a real kohya name always wins over an alias


# --- fitting a LoRA file to a base -------------------------------------------------------------

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
        d_in, d_out = m.in_features, m.out_features
        ok_kind = m.kind == t.kind or {m.kind, t.kind} == {"linear", "conv1x1"}
        if m.algo != "lora" and m.kind == "linear" and t.kind == "conv3x3" and d_in == 9 * t.in_features:
            ok_kind, d_in = True, t.in_features  # a LoHa/LoKr of a 3x3 conv stored flat, [out, in*9]
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


# --- block of a kohya name (any file) ------------------------------------------------------------

def block_of_kohya_name(name: str, arch: Arch, layers_per_block: int = 2) -> str:
    """The block slot of a module name from any kohya-style file (SGM or diffusers UNet names).

    Accepts names with or without the `.lora_down.weight`/`.alpha` suffix. Raises ValueError for names
    that are not LoRA module names.
    """
    base = name.split(".", 1)[0]
    if base.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
        return "BASE"
    if not base.startswith(PREFIX_UNET):
        raise ValueError(f"{name!r} is not a kohya LoRA module name (no lora_unet_/lora_te*_ prefix)")
    rest = base[len(PREFIX_UNET):]
    n_in = layers_per_block + 1
    m = re.match(r"input_blocks_(\d+)_", rest)
    if m:
        return f"IN{int(m[1]):02d}"
    if rest.startswith("middle_block_"):
        return "MID"
    m = re.match(r"output_blocks_(\d+)_", rest)
    if m:
        return f"OUT{int(m[1]):02d}"
    m = re.match(r"down_blocks_(\d+)_(resnets|attentions|downsamplers)_(\d+)_", rest)
    if m:
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"IN{n_in * i + (n_in if kind == 'downsamplers' else j + 1):02d}"
    if rest.startswith("mid_block_"):
        return "MID"
    m = re.match(r"up_blocks_(\d+)_(resnets|attentions|upsamplers)_(\d+)_", rest)
    if m:
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"OUT{n_in * i + (layers_per_block if kind == 'upsamplers' else j):02d}"
    if rest.startswith("conv_in"):
        return "IN00"
    if rest.startswith(("conv_out", "out_2", "conv_norm_out", "out_0")):
        return block_slots(arch)[-1]
    if rest.startswith(("time_embed", "label_emb", "add_embedding")):
        return "BASE"
    raise ValueError(f"cannot tell the block of UNet module {name!r}")


def target_layer(base: BaseModel, t: Target) -> nn.Module:
    """The Linear/Conv2d a target names in `base`; a peft-wrapped layer (during training) as its frozen base layer."""
    model = base.unet if t.model == "unet" else base.text_encoders[0 if t.model == "te1" else 1]
    m = model.get_submodule(t.path)
    if hasattr(m, "get_base_layer"):
        m = m.get_base_layer()
    return m

