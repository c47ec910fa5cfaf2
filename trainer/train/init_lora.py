"""Start a training job from an existing kohya LoRA (`init_lora`, kohya's `network_weights`).

The file is read with the same checks as any LoRA (no pickle, finite weights), must be for the base model's
architecture (every module has a layer of its shape in the base), and must fit this job's network: each of its
modules trained by this job, at this job's rank. A different alpha is fine: the up weights are rescaled so that the
LoRA's effect (up @ down * alpha / rank) is exactly the file's. Modules the file lacks keep their fresh init (a zero
up matrix: no effect until trained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.events import JobFailed
from trainer.format.header import SUFFIX_ALPHA, SUFFIX_DOWN, SUFFIX_UP
from trainer.format.kohya import LoraFileError, read_kohya, resolve_lora_path


def load_init_lora(network: Any, base: Any, ref: str, models_dir: Path | None = None) -> str:
    """Load `ref` into `network`; returns a line for the job's log. Raises JobFailed (bad_input) saying what to
    change when the file does not fit."""
    from trainer.network.targets import check_compatible

    path = resolve_lora_path(ref, models_dir)
    try:
        lora = read_kohya(path)
        check_compatible(lora, base)
    except LoraFileError as e:
        raise JobFailed(f"init_lora: {e}", reason="bad_input") from None
    if not lora.is_plain or getattr(network, "algo", "lora") != "lora":
        raise JobFailed(f"init_lora {path.name}: continuing from a file works for plain LoRA/LoCon networks only "
                        f"(the file is {'/'.join(sorted(lora.algos))}, this job trains "
                        f"{getattr(network, 'algo', 'lora')})", reason="bad_input")
    state = network.network_state()
    ours = {k[: -len(SUFFIX_DOWN)] for k in state if k.endswith(SUFFIX_DOWN)}
    extra = sorted(set(lora.modules) - ours)
    if extra:
        te = any(n.startswith("lora_te") for n in extra)
        raise JobFailed(
            f"init_lora {path.name}: {len(extra)} of its {len(lora.modules)} modules are not trained by this job "
            f"(e.g. {', '.join(extra[:2])}); it was made with other network settings: "
            + ("turn network.train_text_encoder on" if te else "match network.conv_dim / network.blocks to it"),
            reason="bad_input")
    rescaled = 0
    for n, m in lora.modules.items():
        rank = int(state[n + SUFFIX_DOWN].shape[0])
        if m.rank != rank:
            field = "conv_dim" if m.kind == "conv3x3" else "dim"
            raise JobFailed(f"init_lora {path.name} has rank {m.rank} (e.g. {n}) but this job's network.{field} is "
                            f"{rank}; set network.{field} = {m.rank} to continue from it", reason="bad_input")
        alpha = float(state[n + SUFFIX_ALPHA])
        factor = m.alpha / alpha
        rescaled += abs(factor - 1) > 1e-6
        state[n + SUFFIX_DOWN] = m.down.float()
        state[n + SUFFIX_UP] = m.up.float() * factor
    network.load_network_state(state)
    note = f"; alpha differs, up weights rescaled to keep its effect in {rescaled}" if rescaled else ""
    return f"started from {path.name}: {len(lora.modules)} of the network's {len(ours)} modules loaded{note}"
