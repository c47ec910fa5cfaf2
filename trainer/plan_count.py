"""Counts behind the memory plan (``trainer.plan``), measured on the meta device: no weights, no GPU, seconds.

For every config folder we ship (full-size sd15/sd2/sdxl, the tiny and the toy ones) it counts

- parameters of the UNet, the VAE and each text encoder (meta-device models built from the configs);
- the LoRA "in + out" sums per UNet block and per text encoder (``trainer.network.targets.lora_targets``, the
  same module set the network trains), so LoRA params = dim * sum(in + out) (+ conv_dim * sum(in*9 + out));
- the peak of live tensor bytes (``LiveBytes``, a dispatch mode that adds every new tensor's bytes and subtracts
  them when it is freed) of: one UNet forward + backward at batch 1 with a rank-16 LoRA on it, the frozen weights
  in bf16, with and without gradient checkpointing; a no-grad UNet forward at batch 2 (classifier-free guidance
  while sampling); VAE encode and decode in fp32; a text encoder forward + backward (text-encoder training).
  Attention is counted as a flash/memory-efficient kernel (PyTorch SDPA on a GPU): it keeps q, k, v, the output and
  a log-sum-exp, never the n x n matrix, so activations grow linearly with the pixel count and are stored per
  latent pixel.

``python -m trainer.plan_count`` rewrites ``trainer/plan_table.json`` (about a minute on one core); run it after
changing a shipped config. tests/trainer/test_plan.py checks the table against fresh counts of the tiny configs.
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.format.checkpoint import CONFIGS_DIR, FULL_CONFIGS, TINY_CONFIGS, TOY_BASES

TABLE_PATH = Path(__file__).resolve().parent / "plan_table.json"
# The resolution the activations are counted at (they are stored per latent pixel).
COUNT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
TINY_COUNT_RESOLUTION = 64


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created while active (outputs that alias an input are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        for ret, o in zip(func._schema.returns, outs, strict=False):
            if isinstance(o, torch.Tensor) and ret.alias_info is None:
                n = o.numel() * o.element_size()
                self.current += n
                self.peak = max(self.peak, self.current)
                weakref.finalize(o, self._free, n)
        return out


class _FlashLike(torch.autograd.Function):
    """What a memory-efficient attention kernel keeps for backward: q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _flash_attention_on_meta:  # noqa: N801 - used as a context manager
    def __enter__(self) -> None:
        self.orig = F.scaled_dot_product_attention

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
            if q.device.type == "meta":
                return _FlashLike.apply(q, k, v)
            return self.orig(q, k, v, *a, **kw)

        F.scaled_dot_product_attention = sdpa

    def __exit__(self, *exc: Any) -> None:
        F.scaled_dot_product_attention = self.orig


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_sums(base: Any) -> dict[str, Any]:
    from trainer.network.targets import lora_targets

    unet: dict[str, list[int]] = {}
    plain = {t.path for t in lora_targets(base.unet, [], base.arch, conv=False)}
    for t in lora_targets(base.unet, [], base.arch, conv=True):
        row = unet.setdefault(t.block, [0, 0, 0])  # [linear-dim in+out, conv-mode linear-dim in+out, 3x3 in*9+out]
        if t.kind == "conv3x3":
            row[2] += t.in_features * 9 + t.out_features
        elif t.path in plain:
            row[0] += t.in_features + t.out_features
        else:
            row[1] += t.in_features + t.out_features
    tes = lora_targets(None, base.text_encoders, base.arch, conv=False, train_unet=False, train_te=True)
    te_io = [sum(t.in_features + t.out_features for t in tes if t.model == key)
             for key in (["te1", "te2"] if base.arch == "sdxl" else ["te1"])]
    return {"unet_blocks": unet, "text_encoders": te_io}


def vae_factor(vae: Any) -> int:
    """Pixels per latent cell along a side: diffusers' vae_scale_factor (8 for real bases, 4 for the toy VAE)."""
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def _unet_inputs(base: Any, batch: int, res: int, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    meta = "meta"
    lat_side = res // vae_factor(base.vae)
    lat = torch.zeros(batch, base.unet.config.in_channels, lat_side, lat_side, device=meta, dtype=dtype)
    hid = torch.zeros(batch, 77, base.unet.config.cross_attention_dim, device=meta, dtype=dtype)
    kw: dict[str, Any] = {"encoder_hidden_states": hid}
    if base.arch == "sdxl":
        pooled = base.text_encoders[1].config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device=meta, dtype=dtype),
                                   "time_ids": torch.zeros(batch, 6, device=meta, dtype=dtype)}
    return (lat, torch.zeros(batch, dtype=torch.long, device=meta)), kw


def count_config(folder: Path, res: int) -> dict[str, Any]:
    from trainer.models.base import meta_model
    from trainer.network.lora import LoraNetwork

    base = meta_model(folder)
    out: dict[str, Any] = {
        "arch": base.arch,
        "count_resolution": res,
        "params": {"unet": _n(base.unet), "vae": _n(base.vae), "text_encoders": [_n(t) for t in base.text_encoders]},
        "lora": _lora_sums(base),
    }
    factor = vae_factor(base.vae)
    out["vae_factor"] = factor
    pixels = (res // factor) ** 2
    bf16 = torch.bfloat16
    with _flash_attention_on_meta():
        # No-grad passes first (sampling, VAE), on the plain model.
        base.unet.to(bf16)
        with torch.no_grad():
            args, kw = _unet_inputs(base, 2, res, bf16)
            with LiveBytes() as m:
                base.unet(*args, **kw)
            out["unet_infer_per_pixel"] = m.peak / (2 * pixels)
            with LiveBytes() as m:
                base.vae.decode(torch.zeros(1, base.vae.config.latent_channels, res // factor, res // factor,
                                            device="meta"))
            out["vae_decode_per_pixel"] = m.peak / pixels
            with LiveBytes() as m:
                base.vae.encode(torch.zeros(1, 3, res, res, device="meta"))
            out["vae_encode_per_pixel"] = m.peak / pixels
        net = LoraNetwork.create(base, 16, 16.0, seed=0)
        for p in net.trainable_parameters():
            p.data = p.data.float()
        base.unet.train()
        for gc in (False, True):
            if gc:
                base.unet.enable_gradient_checkpointing()
            args, kw = _unet_inputs(base, 1, res, bf16)
            for p in net.trainable_parameters():  # the LoRA's gradients are planned on their own
                p.grad = torch.zeros_like(p)
            with LiveBytes() as m:
                base.unet(*args, **kw).sample.float().pow(2).mean().backward()
            out["unet_train_gc_per_pixel" if gc else "unet_train_per_pixel"] = m.peak / pixels
        te_act = []
        te_base = meta_model(folder)
        te_net = LoraNetwork.create(te_base, 16, 16.0, seed=0, train_unet=False, train_text_encoder=True)
        for p in te_net.trainable_parameters():
            p.grad = torch.zeros_like(p)
        for te in te_base.text_encoders:
            te.to(bf16).train()
            ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
            with LiveBytes() as m:
                te(ids).last_hidden_state.float().pow(2).mean().backward()
            te_act.append(m.peak)
        out["te_train_per_sample"] = te_act
    return out


def count_all() -> dict[str, Any]:
    table: dict[str, Any] = {}
    for arch, name in FULL_CONFIGS.items():
        table[name] = count_config(CONFIGS_DIR / name, COUNT_RESOLUTION[arch])
    for name in (*TINY_CONFIGS.values(), *TOY_BASES):
        table[name] = count_config(CONFIGS_DIR / name, TINY_COUNT_RESOLUTION)
    return table


def main() -> int:
    torch.set_num_threads(1)
    table = count_all()
    TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
