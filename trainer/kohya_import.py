"""kohya sd-scripts settings -> a job spec: what has an equivalent is translated, the rest is listed.

trainer.kohya_read reads a training config (TOML/JSON), a dataset config (also one named by ``dataset_config``) or a
command line; ``import_kohya(path)`` -> ``KohyaImport`` (spec values; translated, not needed, not translated).

Torch-free: the bot uses it for a kohya config attached as ``/train job_file:``.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.kohya_read import (
    KohyaImportError,
    concepts_from_train_data_dir,
    count_images,
    looks_like_kohya,
    num,
    read_kohya_file,
    read_kohya_text,
    read_sample_prompts,
    resolution_side,
    truthy,
)
from trainer.spec import OPTIMIZERS, SCHEDULERS

KOHYA_DEFAULT_STEPS = 1600  # train_network.py's --max_train_steps default
# Settings the engine handles itself: translating them is not needed, so they are not reported as lost.
NOT_NEEDED = {
    "output_dir": "use --out", "logging_dir": "logs go in the job folder", "log_prefix": "", "log_with": "",
    "save_model_as": "LoRAs are always .safetensors", "sdpa": "attention is chosen automatically",
    "xformers": "attention is chosen automatically", "mem_eff_attn": "attention is chosen automatically",
    "network_module": "networks.lora is the LoRA/LoCon this engine trains",
    "num_cpu_threads_per_process": "", "max_data_loader_n_workers": "", "persistent_data_loader_workers": "",
    "dataset_config": "read", "v2": "the architecture is read from the model", "sdxl": "read from the model",
    "save_state": "the training state is always saved", "config_file": "", "caption_extension": "",
}
LORA_TYPES = ("Standard", "Kohya LoCon", "LoCon")  # kohya_ss GUI LoRA_type values this engine trains
LYCORIS_GUI_TYPES = {"LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr"}  # ... and its LyCORIS ones
# kohya_ss GUI JSON names -> sd-scripts names.
ALIASES = {"optimizer": "optimizer_type", "epoch": "max_train_epochs", "max_resolution": "resolution",
           "lr_warmup": "lr_warmup_percent"}


@dataclass
class KohyaImport:
    values: dict[str, Any] = field(default_factory=dict)  # job-spec values (a nested dict)
    translated: list[str] = field(default_factory=list)  # "kohya_key -> spec.field"
    not_needed: list[str] = field(default_factory=list)
    untranslated: list[str] = field(default_factory=list)  # "key = value (why)"

    def report(self) -> str:
        lines = [f"translated {len(self.translated)} settings: " + ", ".join(self.translated)]
        if self.not_needed:
            lines.append("not needed here: " + ", ".join(self.not_needed))
        if self.untranslated:
            lines.append("not translated: " + "; ".join(self.untranslated))
        return "\n".join(lines)


class _Translator:
    def __init__(self, args: dict[str, Any], base_dir: Path, for_bot: bool):
        self.args = {ALIASES.get(k, k): v for k, v in args.items()}
        self.base_dir = base_dir
        self.for_bot = for_bot
        self.out = KohyaImport()
        self.used: set[str] = set()

    def put(self, path: str, value: Any, key: str, how: str = "") -> None:
        node = self.out.values
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        self.out.translated.append(f"{key}{how} -> {path}")
        self.used.add(key)

    @property
    def training_config(self) -> bool:
        """Training settings, not only a dataset config (kohya's training defaults apply then)."""
        return bool({"network_dim", "learning_rate", "unet_lr", "pretrained_model_name_or_path",
                     "max_train_steps", "max_train_epochs", "optimizer_type"} & set(self.args))

    def skip(self, key: str, why: str) -> None:
        self.out.untranslated.append(f"{key} = {self.args.get(key)!r} ({why})")
        self.used.add(key)

    def get(self, key: str) -> Any:
        v = self.args.get(key)
        return None if v in (None, "", "None") else v

    def path(self, value: str) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def run(self) -> KohyaImport:
        a = self.args
        if (v := self.get("pretrained_model_name_or_path")) is not None:
            # On Discord a path on the user's disk means nothing: its file name is looked up in the bot's list.
            self.put("base_model", Path(str(v)).name if self.for_bot else str(v), "pretrained_model_name_or_path")
        if (v := self.get("network_weights")) is not None:  # start from an existing LoRA
            self.put("init_lora", Path(str(v)).name if self.for_bot else str(v), "network_weights")
        if (v := self.get("output_name")) is not None:
            self.put("output_name", re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(v)).lstrip("._- ") or "lora", "output_name")
        for key, dest, conv in (("network_dim", "network.dim", int), ("network_alpha", "network.alpha", float),
                                ("conv_dim", "network.conv_dim", int), ("conv_alpha", "network.conv_alpha", float),
                                ("train_batch_size", "batch_size", int), ("seed", "seed", int),
                                ("gradient_accumulation_steps", "grad_accum", int),
                                ("min_snr_gamma", "min_snr_gamma", float), ("noise_offset", "noise_offset", float),
                                ("prior_loss_weight", "prior_loss_weight", float), ("huber_c", "huber_c", float),
                                *((k, k, float) for k in ("huber_scale", "v_pred_like_loss", "ip_noise_gamma",
                                                          "multires_noise_discount", "adaptive_noise_scale")),
                                *((k, k, int) for k in ("min_timestep", "max_timestep", "multires_noise_iterations")),
                                ("network_dropout", "network.dropout", float),
                                ("validation_seed", "validation_seed", int),
                                ("validate_every_n_steps", "validate_every_n_steps", int),
                                ("lr_scheduler_num_cycles", "optimizer.num_cycles", int),
                                ("lr_scheduler_power", "optimizer.power", float),
                                ("keep_tokens", "data.keep_tokens", int),
                                ("caption_dropout_rate", "data.caption_dropout", float),
                                ("bucket_reso_steps", "data.bucket_step", int),
                                ("min_bucket_reso", "data.bucket_min_side", int),
                                ("max_bucket_reso", "data.bucket_max_side", int)):
            v = self.get(key)
            if v is not None and not (key == "seed" and num(v) in (None, -1)):
                if num(v) is None:
                    self.skip(key, "not a number")
                elif not (key in ("conv_dim", "conv_alpha", "noise_offset", "keep_tokens") and num(v) == 0):
                    self.put(dest, conv(num(v)), key)
                else:
                    self.used.add(key)
        for flag, dest in (("enable_bucket", "data.bucketing"), ("flip_aug", "data.random_flip"),
                           ("shuffle_caption", "data.shuffle_tags"), ("cache_latents", "data.cache_latents"),
                           ("cache_text_encoder_outputs", "data.cache_text_encoder_outputs"),
                           ("gradient_checkpointing", "gradient_checkpointing"),
                           *((k, k) for k in ("zero_terminal_snr", "debiased_estimation_loss", "noise_offset_random_strength",
                                              "scale_v_pred_loss_like_noise_pred", "ip_noise_gamma_random_strength",
                                              "masked_loss"))):
            if flag == "masked_loss" and self.for_bot and truthy(a.get(flag)):
                self.skip(flag, "a Discord dataset has no mask folder")
            elif a.get(flag) not in (None, "", False):
                self.put(dest, truthy(a[flag]), flag)
        for key in ("loss_type", "huber_schedule"):  # kohya's choices are this engine's
            if (v := self.get(key)) not in (None, ""):
                self.put(key, str(v), key)
        self._network_args()
        self._learning_rates()
        self._optimizer()
        self._precision()
        self._data()
        self._steps()
        for key in a:
            if key in self.used:
                continue
            if key in NOT_NEEDED:
                if a[key] not in (None, "", False, 0):
                    self.out.not_needed.append(key + (f" ({NOT_NEEDED[key]})" if NOT_NEEDED[key] else ""))
            elif a[key] not in (None, "", False, 0, [], {}) and key not in ("general", "datasets"):
                self.out.untranslated.append(f"{key} = {a[key]!r}")
        return self.out

    def _network_args(self) -> None:
        rest = []
        lyco: dict[str, str] = {}
        for item in self.args.get("network_args") or []:
            k, _, v = str(item).partition("=")
            k = k.strip()
            if k in ("algo", "dora_wd", "wd_on_output"):
                lyco[k] = v.strip()
            elif k == "factor" and num(v) is not None:
                self.put("network.factor", int(num(v)), "network_args factor")  # type: ignore[arg-type]
            elif k in ("conv_dim", "conv_alpha") and num(v) is not None:
                if k == "conv_dim":
                    self.put("network.conv_dim", int(num(v)), "network_args conv_dim")  # type: ignore[arg-type]
                else:
                    self.put("network.conv_alpha", float(num(v)), "network_args conv_alpha")  # type: ignore[arg-type]
            elif k == "preset" and v.strip().lower() in ("attn-only", "full", "unet-transformer-only"):
                # LyCORIS' presets that match a module set offered here (full / unet-transformer-only: kohya's)
                modules = "attention" if v.strip().lower() == "attn-only" else "transformer"
                self.put("network.unet_modules", modules, f"network_args preset={v.strip()}")
            elif k in ("rank_dropout", "module_dropout") and num(v) is not None:
                self.put(f"network.{k}", float(num(v)), f"network_args {k}")  # type: ignore[arg-type]
            else:
                rest.append(item)
        self.used.add("network_args")
        if rest:
            self.out.untranslated.append(f"network_args {rest!r}")
        lora_type = self.get("LoRA_type")
        if lora_type in LYCORIS_GUI_TYPES:
            self.put("network.type", LYCORIS_GUI_TYPES[lora_type], "LoRA_type")
        elif lora_type is not None and lora_type not in LORA_TYPES:
            self.skip("LoRA_type", f"only {', '.join((*LORA_TYPES, *LYCORIS_GUI_TYPES))} have an equivalent")
        self.used.add("LoRA_type")
        module = self.get("network_module")
        if module == "lycoris.kohya":
            self._lycoris(lyco)
        elif module not in (None, "networks.lora"):
            self.skip("network_module", "only networks.lora (LoRA, LoCon with conv_dim) and lycoris.kohya (LoHa, "
                                        "LoKr, DoRA) have an equivalent")
        elif lyco:
            self.out.untranslated.append(f"network_args {lyco!r} (LyCORIS args without --network_module "
                                         "lycoris.kohya)")

    def _lycoris(self, args: dict[str, str]) -> None:
        """LyCORIS' --network_args algo / dora_wd (its defaults: algo lora, wd_on_output true)."""
        self.used.add("network_module")
        algo = (args.get("algo") or "lora").lower()
        dora = truthy(args.get("dora_wd", "false"))
        how = f" lycoris.kohya, network_args algo={algo}"
        if algo in ("lora", "locon") and dora:
            self.put("network.type", "dora", "network_module", how + " dora_wd=True (decomposed per input column, "
                     "the form A1111 applies; LyCORIS' default is per output row)")
        elif algo in ("loha", "lokr") and not dora:
            self.put("network.type", algo, "network_module", how)
        elif algo in ("lora", "locon"):
            self.put("network.type", "lora", "network_module", how)
        elif algo == "ia3":
            self.skip("network_module", "LyCORIS algo=ia3 is not offered: ComfyUI cannot load IA3 files (only A1111 "
                                        "can); lora/locon (with or without dora_wd), loha and lokr load in both")
        else:
            self.skip("network_module", f"LyCORIS algo={algo}{' with dora_wd' if dora else ''} has no equivalent; "
                                        "lora/locon (with or without dora_wd), loha and lokr do")

    def _learning_rates(self) -> None:
        lr = num(self.get("learning_rate"))
        unet_lr = num(self.get("unet_lr"))
        te_lr = num(self.get("text_encoder_lr"))
        if unet_lr:  # kohya: unet_lr wins over learning_rate for the UNet
            self.put("optimizer.lr", unet_lr, "unet_lr")
            self.used.add("learning_rate")
        elif lr:
            self.put("optimizer.lr", lr, "learning_rate")
        unet_only = truthy(self.args.get("network_train_unet_only", False))
        te_only = truthy(self.args.get("network_train_text_encoder_only", False))
        self.used |= {"network_train_unet_only", "network_train_text_encoder_only", "unet_lr", "text_encoder_lr"}
        # kohya trains the text encoder too unless told not to (or given text_encoder_lr = 0).
        train_te = not unet_only and te_lr != 0
        if not self.training_config:
            return
        self.put("network.train_text_encoder", train_te, "network_train_unet_only" if unet_only
                 else "(kohya trains the text encoder unless network_train_unet_only)")
        if te_only:
            self.put("network.train_unet", False, "network_train_text_encoder_only")
        if train_te and te_lr:
            self.put("network.text_encoder_lr", te_lr, "text_encoder_lr")

    def _optimizer(self) -> None:
        name = self.get("optimizer_type")
        if name is None and truthy(self.args.get("use_8bit_adam", False)):
            name = "AdamW8bit"
            self.used.add("use_8bit_adam")
        if name is not None:
            match = next((o for o in OPTIMIZERS if o.lower() == str(name).lower()), None)
            if match:
                self.put("optimizer.name", match, "optimizer_type")
            else:
                self.skip("optimizer_type", f"choose one of {', '.join(OPTIMIZERS)}")
        rest = []
        for item in self.args.get("optimizer_args") or []:
            k, _, v = str(item).partition("=")
            k = k.strip()
            if k == "weight_decay" and num(v) is not None:
                self.put("optimizer.weight_decay", num(v), "optimizer_args weight_decay")
            elif k == "betas":
                betas = [num(x) for x in v.strip("()[] ").split(",")]
                if len(betas) == 2 and None not in betas:
                    self.put("optimizer.betas", betas, "optimizer_args betas")
                else:
                    rest.append(item)
            elif k in ("eps",) and num(v) is not None:
                self.put("optimizer.eps", num(v), "optimizer_args eps")
            else:
                rest.append(item)
        self.used.add("optimizer_args")
        if rest:
            self.out.untranslated.append(f"optimizer_args {rest!r}")
        sched = self.get("lr_scheduler")
        if sched is not None:
            if str(sched).lower() in SCHEDULERS:
                self.put("optimizer.scheduler", str(sched).lower(), "lr_scheduler")
            else:
                self.skip("lr_scheduler", f"choose one of {', '.join(SCHEDULERS)}")
        if (v := num(self.get("max_grad_norm"))) is not None:
            self.put("optimizer.max_grad_norm", v if v > 0 else None, "max_grad_norm")

    def _precision(self) -> None:
        mp = self.get("mixed_precision")
        if mp is not None:
            if str(mp) in ("no", "fp16", "bf16"):
                self.put("mixed_precision", str(mp), "mixed_precision")
            else:
                self.skip("mixed_precision", "no, fp16 or bf16")
        sp = self.get("save_precision")
        if sp is not None:
            value = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(str(sp))
            if value:
                self.put("save_precision", value, "save_precision")
            else:
                self.skip("save_precision", "float, fp16 or bf16")
        if truthy(self.args.get("v_parameterization", False)):
            self.put("prediction_type", "v_prediction", "v_parameterization")

    def _data(self) -> None:
        ext = self.get("caption_extension")
        if ext is not None and str(ext) not in (".txt", "txt"):
            self.skip("caption_extension", "captions are read from same-name .txt files: rename them")
        else:
            self.used.add("caption_extension")
        if (v := self.get("resolution")) is not None:
            try:
                side, note = resolution_side(v)
                self.put("data.resolution", side, "resolution")
                if note:
                    self.out.untranslated.append(f"resolution = {v!r} ({note})")
            except (TypeError, ValueError):
                self.skip("resolution", "not a size")
        concepts: list[dict[str, Any]] = []
        if (d := self.get("train_data_dir")) is not None:
            root = self.path(d)
            concepts = concepts_from_train_data_dir(root)
            if concepts:
                self.put("concepts", concepts, "train_data_dir")
            elif self.for_bot:
                self.used.add("train_data_dir")  # the bot's dataset gives the images
            else:
                self.skip("train_data_dir", f"{root} has no <repeats>_<prompt> folders of images here; "
                                            "use --images DIR --prompt ...")
        if (d := self.get("reg_data_dir")) is not None:
            self.skip("reg_data_dir", "give each [[concepts]] a class_prompt and class_dir for prior preservation")
        if (d := self.get("dataset_config")) is not None:
            p = self.path(d)
            if p.is_file():
                self._dataset_config(_flatten_dataset(tomllib.loads(p.read_text(encoding="utf-8"))), p.parent)
            else:
                self.skip("dataset_config", f"{p} not found next to the config: import it as well")
        if "datasets" in self.args:
            self._dataset_config(self.args, self.base_dir)

    def _dataset_config(self, cfg: dict[str, Any], base: Path) -> None:
        general = cfg.get("general") or {}
        datasets = cfg.get("datasets") or []
        if len(datasets) > 1:
            self.out.untranslated.append(f"datasets: {len(datasets)} datasets (only the first is translated; "
                                         "one job trains at one resolution)")
        if not datasets:
            return
        ds = {**general, **{k: v for k, v in datasets[0].items() if k != "subsets"}}
        for key in ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                    "bucket_reso_steps", "shuffle_caption", "keep_tokens", "flip_aug", "caption_extension",
                    "caption_dropout_rate"):
            if key in ds and key not in self.used:
                self.args["train_batch_size" if key == "batch_size" else key] = ds[key]
        concepts = []
        for sub in datasets[0].get("subsets") or []:
            if sub.get("is_reg"):
                self.out.untranslated.append(f"subset {sub.get('image_dir')!r} is_reg (use class_prompt/class_dir)")
                continue
            if "image_dir" not in sub:
                self.out.untranslated.append("a subset without image_dir (fine-tuning metadata_file)")
                continue
            p = Path(str(sub["image_dir"]))
            keep = p.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", str(p))  # a Windows path stays as written
            concepts.append({"image_dir": str(p if keep else base / p),
                             "instance_prompt": str(sub.get("class_tokens", "")),
                             "repeats": int(sub.get("num_repeats", 1)), "caption_mode": "caption_only"})
            if (m := sub.get("conditioning_data_dir")) and not self.for_bot:  # the masks of --masked_loss
                mp = Path(str(m))
                concepts[-1]["mask_dir"] = str(mp if mp.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", str(mp))
                                               else base / mp)
            for k in sub:
                if k not in ("image_dir", "class_tokens", "num_repeats", "is_reg", "conditioning_data_dir") \
                        and sub[k] != ds.get(k):
                    self.out.untranslated.append(f"subset {k} = {sub[k]!r}")
        if concepts and not self.for_bot:
            self.put("concepts", concepts, "datasets.subsets")
        self._data_from_dataset()

    def _data_from_dataset(self) -> None:
        for key, dest, conv in (("train_batch_size", "batch_size", int), ("keep_tokens", "data.keep_tokens", int),
                                ("min_bucket_reso", "data.bucket_min_side", int),
                                ("max_bucket_reso", "data.bucket_max_side", int),
                                ("bucket_reso_steps", "data.bucket_step", int),
                                ("caption_dropout_rate", "data.caption_dropout", float)):
            if key in self.args and key not in self.used and num(self.args[key]) is not None:
                self.put(dest, conv(num(self.args[key])), key)
        for flag, dest in (("enable_bucket", "data.bucketing"), ("flip_aug", "data.random_flip"),
                           ("shuffle_caption", "data.shuffle_tags")):
            if flag in self.args and flag not in self.used:
                self.put(dest, truthy(self.args[flag]), flag)
        if "resolution" in self.args and "resolution" not in self.used:
            side, note = resolution_side(self.args["resolution"])
            self.put("data.resolution", side, "resolution")
            if note:
                self.out.untranslated.append(f"resolution ({note})")
        ext = self.args.get("caption_extension")
        if ext is not None and "caption_extension" not in self.used:
            if str(ext) in (".txt", "txt"):
                self.used.add("caption_extension")
            else:
                self.skip("caption_extension", "captions are read from same-name .txt files: rename them")

    def _samples(self, per_epoch: int | None) -> None:
        """sample_prompts (kohya's text file) -> [[sample.prompts]]; sample_every_n_steps/_epochs -> every_n_steps."""
        if (f := self.get("sample_prompts")) is None:
            return
        path = self.path(f)
        if not path.is_file() or path.suffix.lower() != ".txt":
            self.skip("sample_prompts", f"{path} is not a .txt prompt file here: add [[sample.prompts]] to the job")
            return
        prompts, left = read_sample_prompts(path)
        sampler = SAMPLERS.get(str(self.get("sample_sampler") or "ddim").lower())
        if sampler:
            self.used.add("sample_sampler")
            prompts = [{**p, "sampler": sampler} for p in prompts]
        self.put("sample.prompts", prompts, "sample_prompts", f" ({len(prompts)} prompts)")
        if left:
            self.out.untranslated.append(f"sample prompt options {sorted(set(left))!r}")
        every = num(self.get("sample_every_n_steps"))
        every_epochs = num(self.get("sample_every_n_epochs"))
        if every_epochs and per_epoch:  # kohya: the epochs setting wins
            self.put("sample.every_n_steps", int(every_epochs) * per_epoch, "sample_every_n_epochs")
            self.used.add("sample_every_n_steps")
        elif every:
            self.put("sample.every_n_steps", int(every), "sample_every_n_steps")
        if every_epochs and not per_epoch:
            self.skip("sample_every_n_epochs", "the images could not be counted here: set sample.every_n_steps")

    def _steps_per_epoch(self) -> int | None:
        concepts = self.out.values.get("concepts") or []
        images = sum(count_images(Path(c["image_dir"])) * int(c.get("repeats", 1)) for c in concepts)
        if not images:
            return None
        batch = int(self.out.values.get("batch_size", 1)) * int(self.out.values.get("grad_accum", 1))
        return math.ceil(images / batch)

    def _steps(self) -> None:
        per_epoch = self._steps_per_epoch()
        epochs = num(self.get("max_train_epochs"))
        steps = num(self.get("max_train_steps"))
        if epochs:
            if per_epoch:
                self.put("steps", int(epochs) * per_epoch, "max_train_epochs", f" ({int(epochs)} x {per_epoch} steps)")
                self.used.add("max_train_steps")
            else:
                self.skip("max_train_epochs", "the images could not be counted here: set steps")
        if "steps" not in self.out.values:
            if steps:
                self.put("steps", int(steps), "max_train_steps")
            elif self.training_config:
                self.out.values["steps"] = KOHYA_DEFAULT_STEPS
                self.out.translated.append(f"(no max_train_steps) -> steps = {KOHYA_DEFAULT_STEPS}, kohya's default")
        for key in ("save_every_n_epochs", "save_every_n_steps"):
            n = num(self.get(key))
            if not n:
                self.used.add(key)
                continue
            if key == "save_every_n_steps":
                self.put("save_every_n_steps", int(n), key)
            elif per_epoch:
                self.put("save_every_n_steps", int(n) * per_epoch, key, f" ({int(n)} x {per_epoch} steps)")
            else:
                self.skip(key, "the images could not be counted here: set save_every_n_steps")
        self._samples(per_epoch)
        total = int(self.out.values.get("steps", KOHYA_DEFAULT_STEPS))
        if (v := num(self.get("validation_split"))) is not None:  # kohya: a fraction of the images
            if v > 0:
                self.put("validation_split", float(v) if v < 1 else int(v), "validation_split")
            else:
                self.used.add("validation_split")
        # kohya's int_or_float: "10%" and 0.1 are a share of the steps, kept as a fraction so that it follows a
        # later change of steps (the spec resolves it as kohya does, int(fraction x steps)); 1 or more is steps
        raw = self.get("lr_warmup_steps")
        pct = isinstance(raw, str) and raw.strip().endswith("%")
        if (w := num(raw.strip()[:-1] if pct else raw)) is not None:
            w = w / 100 if pct else w
            self.put("optimizer.warmup_steps", float(w) if 0 < w < 1 else int(w), "lr_warmup_steps")
        if (w := num(self.get("lr_warmup_percent"))) is not None and w > 0:
            self.put("optimizer.warmup_steps", w / 100 if w < 100 else total, "lr_warmup")


# kohya's --sample_sampler names -> ours (the others have no equivalent and are reported).
SAMPLERS = {"euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a", "ddim": "ddim",
            "dpmsolver++": "dpmpp_2m"}


def _flatten_dataset(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"general": cfg.get("general") or {}, "datasets": cfg.get("datasets") or []}


def translate(args: dict[str, Any], base_dir: Path = Path("."), for_bot: bool = False) -> KohyaImport:
    """kohya settings (one flat dict, a dataset config's general/datasets kept) -> spec values and a report.
    ``for_bot``: the images come from a dataset, and a model path keeps only its file name."""
    if not looks_like_kohya(args):
        raise KohyaImportError("no kohya settings found (network_dim, learning_rate, train_data_dir, ...)")
    out = _Translator(args, base_dir, for_bot).run()
    out.values["imported_from"] = "kohya"  # kohya's own semantics where they differ (prior_loss_form auto)
    return out


def import_kohya(path: Path, for_bot: bool = False) -> KohyaImport:
    return translate(read_kohya_file(path), path.parent, for_bot)


def import_kohya_text(name: str, text: str, for_bot: bool = True) -> KohyaImport:
    """An attached file's text (the bot): TOML/JSON by its name, else a command line."""
    return translate(read_kohya_text(name, text), Path("."), for_bot)
