"""docs/job-file.md, generated from the spec itself: every field of every section with its type, default, allowed
range and an example, described by the comments next to it in trainer/spec.py. `python -m trainer docs` writes it;
tests/trainer/test_spec_doc.py fails when the committed file differs from what the spec generates.

Torch-free (pydantic and the standard library only).
"""

from __future__ import annotations

import ast
import io
import json
import tokenize
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from trainer import spec as spec_module
from trainer.spec import (
    Concept,
    DataSpec,
    DifferencePair,
    DifferenceSpec,
    GridSpec,
    LoraRef,
    MergeInput,
    MergeSpec,
    NetworkSpec,
    OptimizerSpec,
    PreviewSpec,
    SamplePrompt,
    SampleSpec,
    TrainSpec,
)

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = ROOT / "docs" / "job-file.md"
EXAMPLES = ROOT / "examples"

# (heading, model, TOML path of the section, the example file its examples come from)
SECTIONS: list[tuple[str, type[BaseModel], str, str]] = [
    ("Train jobs (top level)", TrainSpec, "", "tiny-sd15.toml"),
    ("`[[concepts]]`: one per image folder", Concept, "concepts", "tiny-sd15.toml"),
    ("`[network]`", NetworkSpec, "network", "tiny-sd15.toml"),
    ("`[optimizer]`", OptimizerSpec, "optimizer", "tiny-sd15.toml"),
    ("`[data]`", DataSpec, "data", "tiny-sd15.toml"),
    ("`[sample]`: images rendered while training", SampleSpec, "sample", ""),
    ("`[[sample.prompts]]`", SamplePrompt, "sample.prompts", ""),
    ("`[difference]`: copy-machine training (`mode = \"difference\"`)", DifferenceSpec, "difference",
     "difference.toml"),
    ("`[[difference.pairs]]`", DifferencePair, "difference.pairs", "difference.toml"),
    ("Merge jobs (`kind = \"merge\"`)", MergeSpec, "", "merge.toml"),
    ("`[[inputs]]` (merge)", MergeInput, "inputs", "merge.toml"),
    ("`[grid]` (merge and preview)", GridSpec, "grid", "preview.toml"),
    ("Preview jobs (`kind = \"preview\"`)", PreviewSpec, "", "preview.toml"),
    ("`[[loras]]` (preview)", LoraRef, "loras", "preview.toml"),
]

# What each setting does, for the fields whose line in trainer/spec.py carries no comment (a comment there wins).
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("TrainSpec", "kind"): "what the file is; `train` may be left out",
    ("TrainSpec", "mode"): "`difference`: copy-machine training from [[difference.pairs]] (see `[difference]`)",
    ("TrainSpec", "difference"): "the copy-machine settings; needs `mode = \"difference\"`",
    ("TrainSpec", "base_model"): "a built-in tiny model, a name in the models folder (`--models-dir`, also its "
                                 "A1111 `Stable-diffusion/` subfolder), a `.safetensors` checkpoint or a diffusers folder",
    ("TrainSpec", "prediction_type"): "what the base predicts; auto reads it from the model (v_prediction for SD2 768)",
    ("TrainSpec", "output_name"): "the LoRA file's name, without `.safetensors`",
    ("TrainSpec", "concepts"): "the image folders to learn from (see `[[concepts]]`)",
    ("TrainSpec", "network"): "the LoRA's shape (see `[network]`)",
    ("TrainSpec", "optimizer"): "optimizer and learning-rate schedule (see `[optimizer]`)",
    ("TrainSpec", "data"): "resolution, buckets, captions, caching (see `[data]`)",
    ("TrainSpec", "sample"): "images rendered while training (see `[sample]`)",
    ("TrainSpec", "steps"): "optimizer steps to train",
    ("TrainSpec", "batch_size"): "images per step",
    ("TrainSpec", "grad_accum"): "batches whose gradients are summed before each optimizer step",
    ("TrainSpec", "save_precision"): "the dtype of the saved LoRA's weights",
    ("TrainSpec", "seed"): "seeds noise, timesteps, shuffling and the LoRA's initial weights",
    ("TrainSpec", "min_snr_gamma"): "Min-SNR loss weighting (5 is usual); unset: off",
    ("TrainSpec", "noise_offset"): "adds this much per-channel offset noise (darker darks, brighter lights); 0: off",
    ("TrainSpec", "loss_type"): "the denoising loss",
    ("TrainSpec", "huber_c"): "the Huber c (loss_type huber or smooth_l1); with huber_schedule snr/exponential, "
                              "the value at the noisiest timestep",
    ("TrainSpec", "huber_schedule"): "kohya's Huber c per timestep: snr (from ~0.95 at t=0 to huber_c at t=999), "
                                     "exponential (huber_scale to huber_c x huber_scale), constant (huber_c x huber_scale)",
    ("TrainSpec", "huber_scale"): "scales the exponential and constant Huber schedules",
    ("TrainSpec", "noise_offset_random_strength"): "each step's offset is uniform in [0, noise_offset)",
    ("TrainSpec", "multires_noise_iterations"): "multires (pyramid) noise with this many levels (6-10 is usual); "
                                                "unset: off",
    ("TrainSpec", "multires_noise_discount"): "each coarser multires level is damped by this factor",
    ("TrainSpec", "ip_noise_gamma"): "input perturbation noise in the UNet input only (0.1 is usual); unset: off",
    ("TrainSpec", "ip_noise_gamma_random_strength"): "each step's input perturbation is uniform in [0, ip_noise_gamma)",
    ("TrainSpec", "min_timestep"): "the smallest timestep trained (unset: 0)",
    ("TrainSpec", "max_timestep"): "timesteps are drawn below this (unset: 1000); equal to min_timestep: only that one",
    ("TrainSpec", "zero_terminal_snr"): "rescale the noise schedule so the last timestep is pure noise (for v-prediction)",
    ("TrainSpec", "scale_v_pred_loss_like_noise_pred"): "weigh the loss by snr/(snr+1), as an epsilon model's loss is",
    ("TrainSpec", "v_pred_like_loss"): "add this share of a v-prediction-like loss; unset: off",
    ("TrainSpec", "debiased_estimation_loss"): "weigh the loss by 1/sqrt(snr) (v-prediction: 1/(snr+1))",
    ("MergeSpec", "clamp"): "auto: exact where the rank allows, clamped only where fp16 storage would overflow; "
                            "true: kohya's clamp at clamp_quantile; false: never",
    ("TrainSpec", "prior_loss_weight"): "weight of the class-image (prior preservation) loss",
    ("Concept", "image_dir"): "the folder of training images (same-name .txt files are their captions)",
    ("Concept", "instance_prompt"): "the prompt with the trigger word, e.g. \"chibi scs girl\"",
    ("Concept", "class_prompt"): "prior preservation: the prompt of the class (e.g. \"a girl\"); unset: none",
    ("Concept", "class_dir"): "where class images are kept; missing ones are generated from class_prompt",
    ("Concept", "repeats"): "how often each image is seen per epoch (kohya's N_ folder prefix)",
    ("NetworkSpec", "type"): "lora (LoRA/LoCon), or LyCORIS loha, lokr, dora (weight-decomposed LoRA); saved as "
                              "LyCORIS writes them, loaded by A1111 and ComfyUI as they are",
    ("NetworkSpec", "dim"): "the LoRA rank of linear layers",
    ("NetworkSpec", "train_unet"): "train LoRA modules on the UNet",
    ("NetworkSpec", "train_text_encoder"): "train LoRA modules on the text encoder(s) too",
    ("NetworkSpec", "text_encoder_lr"): "the text encoder's learning rate; unset: optimizer.lr",
    ("NetworkSpec", "dropout"): "dropout on the LoRA's hidden activations",
    ("OptimizerSpec", "name"): "the optimizer (8bit ones and Lion come from bitsandbytes)",
    ("OptimizerSpec", "lr"): "the learning rate (Prodigy: 1.0)",
    ("OptimizerSpec", "weight_decay"): "decoupled weight decay",
    ("OptimizerSpec", "betas"): "Adam/Lion betas; unset: the optimizer's own",
    ("OptimizerSpec", "eps"): "Adam epsilon; unset: the optimizer's own",
    ("OptimizerSpec", "scheduler"): "the learning-rate schedule",
    ("OptimizerSpec", "warmup_steps"): "steps of linear warm-up at the start",
    ("OptimizerSpec", "max_grad_norm"): "gradient clipping norm; unset: no clipping",
    ("DataSpec", "resolution"): "training size in px (the shorter side, or the bucket area's side)",
    ("DataSpec", "bucketing"): "aspect-ratio buckets instead of centre crops",
    ("DataSpec", "bucket_step"): "bucket sides are multiples of this",
    ("DataSpec", "bucket_min_side"): "the smallest bucket side",
    ("DataSpec", "bucket_max_side"): "the largest bucket side",
    ("DataSpec", "random_flip"): "flip images horizontally at random",
    ("DataSpec", "shuffle_tags"): "shuffle comma-separated caption tags each step",
    ("DataSpec", "caption_dropout"): "fraction of steps trained with an empty caption",
    ("DataSpec", "cache_latents"): "encode images with the VAE once, before training",
    ("SampleSpec", "prompts"): "the prompts to render (see `[[sample.prompts]]`)",
    ("SampleSpec", "at_end"): "render the prompts once more with the final LoRA",
    ("SamplePrompt", "prompt"): "the prompt",
    ("SamplePrompt", "negative_prompt"): "the negative prompt",
    ("SamplePrompt", "seed"): "the noise seed",
    ("SamplePrompt", "steps"): "denoising steps",
    ("SamplePrompt", "cfg"): "classifier-free guidance scale",
    ("SamplePrompt", "width"): "image width; unset: the training resolution",
    ("SamplePrompt", "height"): "image height; unset: the training resolution",
    ("SamplePrompt", "sampler"): "the sampler",
    ("DifferencePair", "name"): "the pair's name (in file names)",
    ("DifferenceSpec", "pairs"): "the image pairs (see `[[difference.pairs]]`)",
    ("MergeSpec", "kind"): "a merge job",
    ("MergeSpec", "inputs"): "the LoRAs to merge (see `[[inputs]]`)",
    ("MergeSpec", "rank"): "the merged LoRA's rank; auto: the largest input rank",
    ("MergeSpec", "conv_rank"): "the merged LoRA's conv rank; auto: the largest input conv rank",
    ("MergeSpec", "clamp_quantile"): "the quantile kohya's clamp (clamp = true) cuts both SVD factors at",
    ("MergeSpec", "into_checkpoint"): "bake the LoRAs into base_model and write a checkpoint instead of a LoRA",
    ("MergeSpec", "half"): "write the result in fp16",
    ("MergeSpec", "output_name"): "the output file's name, without extension",
    ("MergeSpec", "grid"): "render a strength x seed grid of the merged LoRA (needs base_model)",
    ("MergeSpec", "seed"): "seed of the randomised SVD",
    ("MergeInput", "path"): "a LoRA file (a path, or a name in the models folder)",
    ("MergeInput", "ratio"): "its weight in the merge; negative subtracts it",
    ("GridSpec", "prompt"): "the prompt",
    ("GridSpec", "negative_prompt"): "the negative prompt",
    ("GridSpec", "strengths"): "LoRA strengths, one column each",
    ("GridSpec", "seeds"): "noise seeds, one row each",
    ("GridSpec", "sampler"): "the sampler",
    ("GridSpec", "steps"): "denoising steps",
    ("GridSpec", "cfg"): "classifier-free guidance scale",
    ("GridSpec", "width"): "image width; unset: the base model's native size",
    ("GridSpec", "height"): "image height; unset: the base model's native size",
    ("PreviewSpec", "kind"): "a preview job",
    ("PreviewSpec", "base_model"): "the base model, named as for train jobs",
    ("PreviewSpec", "loras"): "the LoRAs applied (see `[[loras]]`); none: the base model alone",
    ("PreviewSpec", "grid"): "what to render (see `[grid]`)",
    ("PreviewSpec", "output_name"): "the grid file's name, without extension",
    ("LoraRef", "path"): "a LoRA file (a path, or a name in the models folder)",
    ("LoraRef", "strength"): "its strength, multiplied by each grid column's",
    ("DifferenceSpec", "save_copier"): "also keep the pass-1 copier LoRA (to reuse it with `copier`)",
    ("DifferenceSpec", "merge_ratio"): "the ratio of each pair's LoRA in that SVD merge",
}

# Examples for settings that are unset by default and absent from examples/ (the rest show their default).
EXAMPLE_VALUES: dict[str, str] = {
    "difference": "[difference] (see below)", "alpha": "alpha = 8", "conv_alpha": "conv_alpha = 1",
    "text_encoder_lr": "text_encoder_lr = 5e-5", "blocks": 'blocks = "OUT03-OUT05,MID"', "betas": "betas = [0.9, 0.99]",
    "eps": "eps = 1e-8", "cache_text_encoder_outputs": "cache_text_encoder_outputs = true",
    "trigger_word": 'trigger_word = "scs"', "class_prompt": 'class_prompt = "a girl"',
    "class_dir": 'class_dir = "class/girl"', "class_count": "class_count = 100",
    "gradient_checkpointing": "gradient_checkpointing = true", "min_snr_gamma": "min_snr_gamma = 5.0",
    "preset": 'preset = "sd15-8gb"', "width": "width = 512", "height": "height = 768",
    "copier": 'copier = "runs/difference/outputs/copier.safetensors"', "merge_rank": "merge_rank = 8",
    "base_model": 'base_model = "tiny-sd15"', "grid": "[grid] (see below)",
    "block_weights": "block_weights = { MID = 0.0, OUT05 = 0.5 }",
    "adaptive_noise_scale": "adaptive_noise_scale = 0.01", "multires_noise_iterations": "multires_noise_iterations = 6",
    "ip_noise_gamma": "ip_noise_gamma = 0.1", "min_timestep": "min_timestep = 100", "max_timestep": "max_timestep = 900",
    "v_pred_like_loss": "v_pred_like_loss = 0.1", "init_lora": 'init_lora = "runs/first/outputs/lora.safetensors"',
    "mask_dir": 'mask_dir = "images/masks"',
}


HEADER = """# Job files

<!-- Generated from trainer/spec.py by `python -m trainer docs`; do not edit by hand
     (tests/trainer/test_spec_doc.py checks that this file matches the spec). -->

A job file is TOML. `kind` says what it is: `train` (the default), `merge` or `preview`. Every setting below is
optional unless its default says *required*; a misspelt or unknown setting is an error, never silently ignored.

- Run one: `python -m trainer run JOB.toml` (train jobs also with `python -m trainer train JOB.toml`).
- Check one: `python -m trainer validate JOB.toml` prints the fully resolved spec, or what is wrong.
- Precedence: preset (`preset = "sd15-8gb"`, see `python -m trainer presets`) < job file < command-line options
  < `--set key.sub=value`.
- A kohya (sd-scripts) config or command line: `python -m trainer import-kohya FILE` writes the equivalent job file.
- Complete examples that run as written: [examples/](../examples/) (`tiny-sd15.toml` train, `merge.toml`,
  `preview.toml`, `difference.toml`).
"""


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text, whether the line holds only the comment)."""
    out: dict[int, tuple[str, bool]] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            alone = not lines[line - 1][: tok.start[1]].strip()
            out[line] = (tok.string.lstrip("#").strip(), alone)
    return out


def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment lines above the field and the one after it, joined."""
    source = Path(spec_module.__file__).read_text(encoding="utf-8")
    comments = _comments(source)
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            after = comments.get(stmt.end_lineno or stmt.lineno)
            text = " ".join(above + ([after[0]] if after and not after[1] else []))
            out[(node.name, stmt.target.id)] = text
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in args)
        return text + (" (optional)" if len(args) < len(get_args(tp)) else "")
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in get_args(tp)) + "]"
    if origin is dict:
        return "table"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


def _range(field: Any) -> str:
    parts = []
    unit = " items" if get_origin(field.annotation) is list else " characters"
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "multiple of"),
                          ("min_length", "at least"), ("max_length", "at most")):
            v = getattr(m, attr, None)
            if v is not None:
                u = unit if attr.endswith("length") else ""
                parts.append(f"{sym} {v:g}{u}" if isinstance(v, float) else f"{sym} {v}{u}")
        if getattr(m, "pattern", None):
            parts.append("letters, digits, `_ - .` and spaces")
    return ", ".join(parts)


def _value(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, BaseModel):
        return "(section)"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return _value(field.default_factory())
    if field.default is PydanticUndefined:
        return "*required*"
    return _value(field.default)


def _example(values: dict[str, Any], section: str, name: str, field: Any) -> str:
    found = _example_from(values, section, name)
    if found:
        return found
    if name in EXAMPLE_VALUES and field.default is None:
        return f"`{EXAMPLE_VALUES[name]}`"
    default = _default(field)
    if default in ("(section)", "*required*") or field.default_factory is list:
        return "(see below)" if default == "(section)" else ""
    return f"`{name} = {default}`"


def _example_from(values: dict[str, Any], section: str, name: str) -> str:
    node: Any = values
    for part in [p for p in section.split(".") if p] + [name]:
        if isinstance(node, list):
            node = node[0] if node else None
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    if isinstance(node, dict | list) and any(isinstance(x, dict) for x in (node if isinstance(node, list) else [node])):
        return "(see below)"
    return f"`{name} = {_value(node)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def job_file_markdown() -> str:
    """The whole reference, as committed in docs/job-file.md."""
    comments = field_comments()
    out = [HEADER]
    for heading, model, section, example_file in SECTIONS:
        values = tomllib.loads((EXAMPLES / example_file).read_text(encoding="utf-8")) if example_file else {}
        level = "##" if not section else "###"
        out.append(f"{level} {heading}\n")
        if model.__doc__ and not model.__doc__.startswith("!!!") and model.__doc__ != BaseModel.__doc__:
            out.append(model.__doc__.strip() + "\n")
        out.append("| setting | type | default | allowed | example | what it does |")
        out.append("|---|---|---|---|---|---|")
        for name, field in model.model_fields.items():
            desc = comments.get((model.__name__, name)) or DESCRIPTIONS.get((model.__name__, name), "")
            out.append("| " + " | ".join(_cell(c) for c in (
                f"`{name}`", _type_name(field.annotation), _default(field), _range(field),
                _example(values, section, name, field), desc)) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_doc(path: Path = DOC_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(job_file_markdown(), encoding="utf-8")
    return path
