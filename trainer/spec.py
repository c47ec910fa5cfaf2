"""The job spec: one validated schema for the CLI, TOML job files and the slash commands.

Every job keeps its fully resolved spec (presets applied, defaults filled in), so `/retrain` and the CLI
reproduce it exactly. Validation errors name the field and the allowed values.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class SpecError(ValueError):
    """A job spec is invalid. `problems` lists (field, message) pairs; str() is ready to show a user."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in problems))


# Every name from a user that becomes part of a path: letters, digits, "_", "-", ".", spaces; no leading dot or
# separator, so it can never leave its folder or hide itself.
FileName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")]


class _Strict(BaseModel):
    # extra="forbid": a typo in a TOML file is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _canonical(value: Any, allowed: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for a in allowed:
            if a.lower() == value.strip().lower():
                return a
    return value


class SamplePrompt(_Strict):
    prompt: str
    negative_prompt: str = ""
    seed: int = 1111
    steps: int = Field(20, ge=1, le=150)
    cfg: float = Field(7.0, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    sampler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"] = "euler_a"

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler(cls, v: Any) -> Any:
        return _canonical(v, SAMPLERS)


class Concept(_Strict):
    image_dir: str
    instance_prompt: str = ""
    # How per-image .txt captions combine with the instance prompt (the DreamBooth extension's [filewords]).
    caption_mode: Literal["instance_and_caption", "caption_only", "instance_only"] = "instance_and_caption"
    class_prompt: str | None = None
    class_dir: str | None = None
    # None: data.class_images_per_image x this concept's image count when a class_prompt is set, else 0.
    # 0: no prior preservation for this concept.
    class_count: int | None = Field(None, ge=0, le=10000)
    repeats: int = Field(1, ge=1, le=1000)
    # masked_loss: a folder with one mask per image under the image's name (kohya's conditioning_data_dir)
    mask_dir: str | None = None


NETWORK_TYPES = ("lora", "loha", "lokr", "dora")


class NetworkSpec(_Strict):
    # lora: kohya's LoRA/LoCon (peft); loha, lokr, dora: LyCORIS' LoHa, LoKr and DoRA (lycoris-lora), saved as
    # LyCORIS writes them (ss_network_module "lycoris.kohya"); dora is a LoRA with weight decomposition.
    # IA3 is not offered: ComfyUI has no IA3 loader (A1111 has one), so such a file would not load for everyone.
    type: Literal["lora", "loha", "lokr", "dora"] = "lora"
    dim: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, le=4096)  # None: alpha = dim
    conv_dim: int = Field(0, ge=0, le=1024)  # 0: plain LoRA; > 0: LoCon conv layers too
    conv_alpha: float | None = Field(None, gt=0, le=4096)  # None: conv_alpha = conv_dim
    train_unet: bool = True
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0, le=1.0)
    blocks: str | None = None  # e.g. "OUT03-OUT05,MID"; None: every block
    # Which UNet layers of each transformer block train: "transformer" = kohya's LoRA (attention q/k/v/out,
    # proj_in/out, feed-forward); "attention" = q/k/v/out only (diffusers' and peft's LoRA examples, LyCORIS' attn-only)
    unet_modules: Literal["transformer", "attention"] = "transformer"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # kohya's network_dropout: on the rank-r activations
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # kohya's: whole ranks per sample, rescaled by 1/(1-p)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # kohya's: a layer's whole LoRA skipped for a step
    # LoKr: LyCORIS' factor of the Kronecker split (-1: as square as the layer allows; e.g. 8 or 16 keeps the
    # small factor that size). A dim that is too large for the layer makes LyCORIS use full matrices (alpha unused)
    factor: int = Field(-1, ge=-1, le=1024)

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.dim)

    @property
    def resolved_conv_alpha(self) -> float:
        return float(self.conv_alpha if self.conv_alpha is not None else max(self.conv_dim, 1))

    @field_validator("unet_modules", mode="before")
    @classmethod
    def _unet_modules(cls, v: Any) -> Any:
        aliases = {"attn-only": "attention", "attn_only": "attention", "kohya": "transformer"}  # LyCORIS' preset name
        return aliases.get(v.strip().lower(), v.strip().lower()) if isinstance(v, str) else v

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("locon", "networks.lora"):
            return "lora"  # LoCon is a LoRA with conv_dim
        if isinstance(v, str):
            v = v.strip().lower()
        if v in ("ia3", "lycoris.ia3"):
            # Not offered: a file must load in both A1111 and ComfyUI, and ComfyUI has no IA3 loader.
            raise ValueError("network type ia3 is not offered: ComfyUI cannot load IA3 files (only A1111 can), so "
                             "the LoRA would not work for everyone who downloads it; choose lora, loha, lokr or dora")
        if v not in NETWORK_TYPES:
            raise ValueError(f"unknown network type {v!r}; choose one of {', '.join(NETWORK_TYPES)} "
                             "(LoCon is lora with conv_dim > 0)")
        return v

    @model_validator(mode="after")
    def _something_trains(self) -> NetworkSpec:
        if not self.train_unet and not self.train_text_encoder:
            raise ValueError("train_unet and train_text_encoder are both off: nothing would be trained")
        if self.factor != -1 and (self.type != "lokr" or self.factor < 1):
            raise ValueError(f"factor {self.factor} is for network type lokr only, and is -1 (automatic) or >= 1")
        if self.type != "lora" and (self.dropout or self.rank_dropout or self.module_dropout):
            raise ValueError(f"dropout, rank_dropout and module_dropout follow kohya's LoRA and are not available "
                             f"for network type {self.type}: set them to 0 or use type lora")
        return self


class OptimizerSpec(_Strict):
    name: Literal["AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor"] = "AdamW"
    lr: float = Field(1e-4, gt=0, le=10.0)
    weight_decay: float = Field(0.01, ge=0, le=10.0)
    betas: tuple[float, float] | None = None
    eps: float | None = Field(None, gt=0)
    scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "cosine"
    warmup_steps: int | float = Field(0, ge=0)  # a fraction below 1 is that share of the steps (kohya's reading)
    num_cycles: int = Field(1, ge=1, le=1000)  # cosine_with_restarts
    power: float = Field(1.0, gt=0, le=10.0)  # polynomial
    max_grad_norm: float | None = Field(1.0, gt=0)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> Any:
        return _canonical(v, OPTIMIZERS)

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError("warmup_steps is a whole number of steps, or a fraction below 1 (0.1 = 10% of steps)")
            return int(v)
        return v

    def resolved_warmup(self, total_steps: int) -> int:
        """kohya: int(fraction x steps) for a fraction, else the steps as given."""
        return int(self.warmup_steps * total_steps) if isinstance(self.warmup_steps, float) else self.warmup_steps

    @field_validator("scheduler", mode="before")
    @classmethod
    def _sched(cls, v: Any) -> Any:
        return _canonical(v, SCHEDULERS)


class DataSpec(_Strict):
    resolution: int = Field(512, ge=64, le=4096, multiple_of=8)
    bucketing: bool = False  # aspect-ratio buckets instead of center crops
    bucket_step: int = Field(64, ge=8, le=256, multiple_of=8)
    bucket_min_side: int = Field(256, ge=64, le=4096, multiple_of=8)
    bucket_max_side: int = Field(1024, ge=64, le=8192, multiple_of=8)
    random_flip: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = Field(0, ge=0, le=100)  # tags kept in place at the front when shuffling
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    trigger_word: str | None = None  # always kept first in every caption
    cache_latents: bool = True
    # None (auto): cache them when the text encoders are frozen and captions do not change from step to step
    # (no shuffle_tags / caption_dropout), which skips the text encoders during training. True asks for it
    # (with a warning when it cannot apply); False never caches.
    cache_text_encoder_outputs: bool | None = None
    # The DreamBooth extension's "class images per instance image": the class_count of every concept that has a
    # class_prompt but no class_count of its own (0: none).
    class_images_per_image: int = Field(0, ge=0, le=100)

    @model_validator(mode="after")
    def _bucket_sides(self) -> DataSpec:
        if self.bucket_min_side > self.bucket_max_side:
            raise ValueError("bucket_min_side must not exceed bucket_max_side")
        return self


class SampleSpec(_Strict):
    prompts: list[SamplePrompt] = Field(default_factory=list)
    every_n_steps: int = Field(0, ge=0)  # 0: only at the end
    at_end: bool = True


class DifferencePair(_Strict):
    name: str = Field("pair", min_length=1, max_length=60, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")
    original: str  # the image the copier learns to reproduce
    target: str  # the edited image; the pass-2 LoRA learns only what changed


class DifferenceSpec(_Strict):
    """Copy-machine training (sd-webui-traintrain's Difference mode): copier on the original, then the change."""

    pairs: list[DifferencePair] = Field(min_length=1, max_length=8)
    prompt: str = ""  # the same conditioning for both passes; "" = empty prompt
    # Pass-2 overrides of this spec's fields (network, optimizer, steps, seed, ...); unset fields keep pass 1's.
    pass2: dict[str, Any] = Field(default_factory=dict)
    save_copier: bool = False
    copier: str | None = None  # a saved copier LoRA to reuse (pass 1 is skipped); same original only
    # The copier must lower the denoising loss on the original by at least this fraction, or the job stops.
    copier_min_improvement: float = Field(0.5, ge=0.0, lt=1.0)
    merge_rank: int | None = Field(None, ge=1, le=1024)  # several pairs: also write their SVD merge at this rank
    merge_ratio: float = Field(1.0, ge=-10, le=10)
    # Pairs of different sizes: fit the target to the original's size with a centre crop instead of refusing.
    resize_pairs: bool = False

    @field_validator("pairs")
    @classmethod
    def _unique_names(cls, pairs: list[DifferencePair]) -> list[DifferencePair]:
        names = [p.name for p in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pair names must be unique (got {', '.join(names)}); name them e.g. front, left, right")
        return pairs


class TrainSpec(_Strict):
    kind: Literal["train"] = "train"
    mode: Literal["standard", "difference"] = "standard"
    difference: DifferenceSpec | None = None
    base_model: str = "tiny-sd15"
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    output_name: FileName = "lora"
    concepts: list[Concept] = Field(default_factory=list)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    # Start from an existing kohya LoRA (kohya's network_weights): a path, or a file name in the models folder.
    # Its architecture and ranks must match this job's network (network.dim, conv_dim, text encoder).
    init_lora: str | None = Field(None, min_length=1, max_length=500)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    sample: SampleSpec = Field(default_factory=SampleSpec)
    steps: int = Field(1000, ge=1, le=200_000)
    batch_size: int = Field(1, ge=1, le=64)
    grad_accum: int = Field(1, ge=1, le=256)
    # Defaults that fit the cards (an 8 GB GPU for SD1.5 at 512 px, a 10 GB GPU for SDXL at 1024 px; see
    # ../shared/facts.md section 4) are resolved when the job runs, on the device it runs on; the values that ran
    # go into the LoRA's ss_mixed_precision / ss_gradient_checkpointing and a `log` event.
    # "auto": bf16 on a GPU with native bf16 (compute capability 8.0+), else fp16 (with a GradScaler); on CPU "no"
    # (fp32).
    # Explicit values behave as written ("fp16" on CPU trains in fp32 and says so).
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    # None (auto): on a GPU the memory plan decides (trainer.plan.choose_auto): on only when the job would not fit
    # the card without it (it costs ~35% more compute), e.g. SDXL at 1024 px on 10 GB; when no plan can be made,
    # on for SDXL only. Off on CPU. True/False force it.
    gradient_checkpointing: bool | None = None
    # Attention: PyTorch SDPA (torch >= 2 picks flash / memory-efficient kernels itself, as fast and as lean as
    # xformers). True uses xformers' memory-efficient attention on a GPU when it is installed (opt-in).
    xformers: bool = False
    # torch.compile of the UNet (the same maths, compiled kernels). "auto": on only for GPU jobs of 1000+ steps,
    # where the minutes it takes to compile pay back; off on CPU (docs/benchmarks-peers.md has the measurements).
    compile: Literal["auto"] | bool = "auto"
    # The UNet's tensors in channels-last (NHWC) memory layout; same maths. "auto": on a GPU, off on CPU.
    channels_last: Literal["auto"] | bool = "auto"
    seed: int = Field(1111, ge=0, le=2**32 - 1)
    min_snr_gamma: float | None = Field(None, gt=0, le=100)
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = Field(None, ge=-1.0, le=1.0)  # + this x |latent mean|; needs noise_offset
    multires_noise_iterations: int | None = Field(None, ge=1, le=20)
    multires_noise_discount: float = Field(0.3, gt=0.0, le=1.0)
    ip_noise_gamma: float | None = Field(None, gt=0.0, le=1.0)
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = Field(None, ge=0, le=999)
    max_timestep: int | None = Field(None, ge=1, le=1000)
    zero_terminal_snr: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = Field(None, gt=0.0, le=10.0)
    debiased_estimation_loss: bool = False
    # kohya's masked_loss: each image's loss weighted by its mask (concepts[].mask_dir; white learns, black not)
    masked_loss: bool = False
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    huber_c: float = Field(0.1, gt=0, le=10)
    huber_scale: float = Field(1.0, gt=0, le=10)
    prior_loss_weight: float = Field(1.0, ge=0, le=100)
    # how a batch mixing instance and class images is averaged (docs/training-options.md); auto: kohya's when
    # the job came from a kohya config, else diffusers'
    prior_loss_form: Literal["auto", "kohya", "diffusers"] = "auto"
    imported_from: Literal["kohya"] | None = None  # set by `trainer import-kohya`
    # kohya's validation_split: held-out instance images (a fraction below 1, or a count) whose fixed-noise loss
    # is measured every validate_every_n_steps steps (unset: every tenth of the run) and at the end
    validation_split: int | float = Field(0, ge=0)
    validation_seed: int | None = Field(None, ge=0, le=2**32 - 1)  # which images are held out; unset: seed
    validate_every_n_steps: int | None = Field(None, ge=1)
    keep_best: bool = False  # also keep the LoRA of the lowest validation loss as <output_name>-best
    save_every_n_steps: int = Field(0, ge=0)  # intermediate LoRA files; 0: only the final one
    state_every_n_steps: int = Field(50, ge=1)  # full training state for resume
    preset: str | None = None  # informational: the preset this spec was resolved from

    @field_validator("validation_split")
    @classmethod
    def _split(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError("validation_split is a fraction below 1 (0.1 = 10% of the images) or a whole count")
            return int(v)
        return v

    @model_validator(mode="after")
    def _checks(self) -> TrainSpec:
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise ValueError("adaptive_noise_scale adds to noise_offset: set noise_offset too (e.g. 0.05)")
        if (self.min_timestep or 0) > (self.max_timestep or 1000):
            raise ValueError(f"min_timestep ({self.min_timestep}) must not exceed max_timestep ({self.max_timestep})")
        if self.huber_schedule == "exponential" and self.huber_c >= 1 and self.loss_type in ("huber", "smooth_l1"):
            raise ValueError("huber_schedule 'exponential' decays from huber_scale to huber_c: huber_c must be below 1")
        if self.keep_best and not self.validation_split:
            raise ValueError("keep_best picks the LoRA by its validation loss: set validation_split too (e.g. 0.1)")
        with_masks = [i for i, c in enumerate(self.concepts) if c.mask_dir]
        if self.masked_loss and not with_masks:
            raise ValueError("masked_loss needs mask images: set mask_dir on the concepts (a folder with one mask "
                             "per image under the image's name; white: learn, black: ignore)")
        if with_masks and not self.masked_loss:
            raise ValueError(f"concepts[{with_masks[0]}].mask_dir is set but masked_loss is off: set "
                             "masked_loss = true to use the masks, or remove mask_dir")
        if self.network.blocks is not None:
            self.network.blocks = self.network.blocks.strip() or None
        if self.init_lora is not None and self.network.type != "lora":
            raise ValueError(f"init_lora continues a plain LoRA/LoCon; network.type {self.network.type} starts "
                             "from scratch: leave out init_lora or use type lora")
        if self.mode == "difference":
            if self.difference is None:
                raise ValueError("mode 'difference' needs a [difference] section with at least one pair")
            # the copier is applied to pass 2 as a peft LoRA adapter
            if self.network.type != "lora" or self.pass2_spec().network.type != "lora":
                raise ValueError("mode 'difference' trains LoRA/LoCon networks only: set network.type = 'lora'")
        elif self.difference is not None:
            raise ValueError("a [difference] section needs mode = 'difference'")
        return self

    @property
    def resolved_prior_loss_form(self) -> str:
        if self.prior_loss_form != "auto":
            return self.prior_loss_form
        return "kohya" if self.imported_from == "kohya" else "diffusers"

    def pass2_spec(self) -> TrainSpec:
        """This spec with the pass-2 overrides applied: every pass-2 field defaults to pass 1's."""
        assert self.difference is not None
        over = self.difference.pass2
        bad = {"mode", "difference", "kind", "concepts", "base_model"} & set(over)
        if bad:
            raise ValueError(f"difference.pass2 cannot change {', '.join(sorted(bad))}")
        base = self.model_dump(mode="python", exclude={"difference"})
        base["mode"] = "standard"
        try:
            return TrainSpec.model_validate(deep_merge(base, over))
        except ValidationError as err:
            msgs = "; ".join(f"difference.pass2.{f}: {m}" for f, m in _problems(err))
            raise ValueError(msgs) from None


class MergeInput(_Strict):
    path: str
    ratio: float = Field(1.0, ge=-10, le=10)
    # Per-block weights by block name (BASE, IN00.., MID, OUT..); blocks not named keep weight 1.0.
    block_weights: dict[str, float] | None = None


class GridSpec(_Strict):
    prompt: str = ""
    negative_prompt: str = ""
    strengths: list[float] = Field(default_factory=lambda: [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0], min_length=1, max_length=12)
    seeds: list[int] = Field(default_factory=lambda: [1111, 2222, 3333], min_length=1, max_length=8)
    sampler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"] = "euler_a"
    steps: int = Field(20, ge=1, le=150)
    cfg: float = Field(7.0, ge=0, le=30)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler(cls, v: Any) -> Any:
        return _canonical(v, SAMPLERS)


class MergeSpec(_Strict):
    kind: Literal["merge"] = "merge"
    inputs: list[MergeInput] = Field(min_length=1, max_length=16)
    rank: int | Literal["auto"] = "auto"
    conv_rank: int | Literal["auto"] = "auto"
    # "auto": exact where the rank allows, clamped only where fp16 storage would overflow; true: kohya's
    # svd_merge_lora.py clamp of both factors to their `clamp_quantile` quantile; false: never clamped.
    clamp: bool | Literal["auto"] = "auto"
    clamp_quantile: float | None = Field(0.99, gt=0, le=1.0)
    base_model: str | None = None  # checked for compatibility; required for a checkpoint merge or a grid
    into_checkpoint: bool = False
    half: bool = False
    output_name: FileName = "merged"
    grid: GridSpec | None = None
    seed: int = 0

    @field_validator("rank", "conv_rank")
    @classmethod
    def _rank(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("rank must be between 1 and 1024, or 'auto'")
        return v


class LoraRef(_Strict):
    path: str
    strength: float = Field(1.0, ge=-10, le=10)


class PreviewSpec(_Strict):
    kind: Literal["preview"] = "preview"
    base_model: str = "tiny-sd15"
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)
    grid: GridSpec = Field(default_factory=GridSpec)
    output_name: FileName = "preview"


JobSpec = Annotated[TrainSpec | MergeSpec | PreviewSpec, Field(discriminator="kind")]
_JOB = TypeAdapter(JobSpec)


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("train", "merge", "preview")))
        msg = e["msg"]
        if e["type"] == "literal_error":
            msg = f"{e['msg']} (got {e.get('input')!r})"
        elif e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling)"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        out.append((loc, msg.replace("Value error, ", "")))
    return out


def parse_job(data: dict[str, Any]) -> TrainSpec | MergeSpec | PreviewSpec:
    data = dict(data)
    data.setdefault("kind", "train")
    try:
        return _JOB.validate_python(data)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the `description` key of the preset file)."""
    return {p.stem: tomllib.loads(p.read_text()).get("description", "") for p in sorted(PRESETS_DIR.glob("*.toml"))}


def preset_values(name: str) -> dict[str, Any]:
    # A closed list: the name is looked up among the shipped files, never joined into a path.
    known = {p.stem: p for p in PRESETS_DIR.glob("*.toml")}
    if name not in known:
        raise SpecError([("preset", f"unknown preset {name!r}; choose one of {', '.join(sorted(known))}")])
    path = known[name]
    values = tomllib.loads(path.read_text())
    values.pop("description", None)
    return values


def resolve_job(values: dict[str, Any], preset: str | None = None) -> TrainSpec | MergeSpec | PreviewSpec:
    """Apply a preset (if any, from the argument or a `preset` key), then the given values field by field."""
    preset = preset or values.get("preset")
    merged = dict(values)
    if preset:
        merged = deep_merge(preset_values(preset), values)
        merged["preset"] = preset
    return parse_job(merged)


def load_toml_text(text: str, source: str = "job file") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError([("", f"{source} is not valid TOML: {e}")]) from None


def load_job_file(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainSpec | MergeSpec | PreviewSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError([("", f"job file {p} does not exist")])
    values = load_toml_text(p.read_text(encoding="utf-8"), source=str(p))
    return resolve_job(deep_merge(values, overrides or {}))


def to_toml(spec: BaseModel) -> str:
    """The fully resolved spec as TOML (None values are left out: TOML has no null)."""
    return tomli_w.dumps(spec.model_dump(mode="json", exclude_none=True))


def from_json(text: str) -> TrainSpec | MergeSpec | PreviewSpec:
    try:
        return _JOB.validate_json(text)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None


def to_json(spec: BaseModel) -> str:
    return spec.model_dump_json()
