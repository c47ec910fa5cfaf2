"""CLIP tokenizers built offline: a byte-level one for the tiny built-in models, the real CLIP BPE for full-size ones.

Nothing is downloaded: the byte-level vocabulary is built in memory, and the 49,408-token CLIP BPE is read from
open_clip's ``bpe_simple_vocab_16e6.txt.gz`` when the open_clip_torch wheel is installed (facts.md section 3).
"""

from __future__ import annotations

import gzip
import logging
import os
import sys
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

from trainer.format.header import Arch

log = logging.getLogger(__name__)


def _bytes_to_unicode() -> list[str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_local_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory: every text tokenizes, nothing is downloaded."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    return tok


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the best-ranked adjacent pair until none is a merge."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(words: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that make each of ``words`` one token. A merge is appended only when a word still splits: it
    ranks after every earlier one, so it never changes how an already whole word is merged."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        while len(parts := _bpe(w, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
    return merges


def build_toy_tokenizer() -> CLIPTokenizer:
    """The toy bases' tokenizer: like CLIP, every common word (each word of the toy world's captions) is one
    token; any other word (a LoRA's trigger word such as "zqx") falls back to byte-level tokens, as rare words do
    in CLIP. The byte tokens keep the ids of ``build_local_tokenizer``; the words follow, then the two specials."""
    from trainer.toy.world import CAPTION_WORDS

    chars = _bytes_to_unicode()
    merges = word_merges(CAPTION_WORDS)
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab_list)}, merges=merges)
    tok.model_max_length = 77
    return tok


# --- CLIP ------------------------------------------------------------------------------------------

CLIP_VOCAB = 49408
_N_MERGES = 49152 - 256 - 2  # open_clip's SimpleTokenizer keeps this many merges (48894)


def find_clip_bpe() -> Path | None:
    """open_clip's BPE file, if the open_clip_torch wheel is installed (found without importing open_clip)."""
    env = os.environ.get("LORAFORGE_CLIP_BPE")
    if env and Path(env).is_file():
        return Path(env)
    for entry in sys.path:
        p = Path(entry or ".") / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    return None


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", bpe_path: Path | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer full-size models need, built offline.

    With open_clip's BPE file: exactly CLIP's vocabulary (256 byte chars, the same + '</w>', the first 48,894
    merges joined, then the two special tokens). Without it: byte-level tokens at the same ids (CLIP's first 512 ids
    are exactly those) padded to 49,408 so special ids match; prompts are then tokenized byte-wise (a warning says so).
    """
    chars = _bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    bpe_path = bpe_path or find_clip_bpe()
    merges: list[tuple[str, str]] = []
    if bpe_path is not None:
        lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1 : _N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines if line.strip()]  # type: ignore[misc]
        vocab_list += ["".join(m) for m in merges]
    else:
        log.warning("open_clip's bpe_simple_vocab_16e6.txt.gz was not found (pip install --no-deps open_clip_torch): "
                    "prompts will be tokenized byte-wise, which full-size models understand poorly")
        vocab_list += [f"<|unused{i}|>" for i in range(CLIP_VOCAB - 2 - len(vocab_list))]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def tokenizers_for(arch: Arch, config_name: str) -> list[CLIPTokenizer]:
    """One tokenizer per text encoder: byte-level ones for the tiny configs, word-level ones for the toy configs
    (``build_toy_tokenizer``), CLIP's for full-size models."""
    # SD2 and SDXL's OpenCLIP encoder pad with "!" (id 0); CLIP-L pads with <|endoftext|>.
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[arch]
    if config_name.startswith("toy-"):
        return [build_toy_tokenizer() for _ in pads]
    if config_name.startswith("tiny-"):
        return [build_local_tokenizer() for _ in pads]
    bpe = find_clip_bpe()
    return [build_clip_tokenizer(pad, bpe) for pad in pads]
