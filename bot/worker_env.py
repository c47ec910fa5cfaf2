"""The environment a worker process starts with: an allow-list, never the bot's own secrets.

A worker runs engine code on user-supplied specs and files; it (and anything it spawns) must not be
able to read the Discord token or the link-signing secret. So a worker gets only the variables it
needs (paths, locale, Python, Hugging Face, CUDA/ROCm, thread counts, the engine's own cache
settings) plus any extra names the operator lists in ``workers.env_pass``. Whatever the list says, a
name that looks like a credential (TOKEN, SECRET, KEY, PASSWORD, ...) or is the configured token /
link-secret variable is dropped.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

# Names (shell-style patterns) a worker may inherit. Keep it short: every entry is a way in.
ALLOWED: tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM",
    "TMPDIR", "TEMP", "TMP", "XDG_CACHE_HOME",
    "PYTHONPATH", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONDONTWRITEBYTECODE",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "HF_*", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_*", "DIFFUSERS_*", "SAFETENSORS_*",
    "TORCH_*", "PYTORCH_*", "CUDA_*", "NVIDIA_*", "CUBLAS_*", "CUDNN_*", "NCCL_*",
    "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HSA_*", "ZE_AFFINITY_MASK",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "LORAFORGE_CACHE", "LORAFORGE_CLIP_BPE",
)
# A credential by its name, wherever it came from (HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD...).
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSW|PWD$|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


def looks_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def worker_environment(
    source: Mapping[str, str],
    *,
    extra: Iterable[str] = (),
    deny: Iterable[str] = (),
) -> dict[str, str]:
    """The subset of ``source`` a worker may see. ``extra``: more allowed names/patterns (config
    ``workers.env_pass``); ``deny``: names never passed (the configured token and secret variables)."""
    patterns = (*ALLOWED, *extra)
    denied = {d for d in deny if d}
    out: dict[str, str] = {}
    for name, value in source.items():
        if name in denied or looks_secret(name):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out[name] = value
    return out
