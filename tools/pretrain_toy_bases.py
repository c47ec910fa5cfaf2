"""Re-create the toy bases shipped in trainer/toy/bases/ (docs/toy-world.md).

    nice -n 10 python tools/pretrain_toy_bases.py [--out trainer/toy/bases] [--only sd15|sdxl] [--seed 0]
        [--vae-from trainer/toy/bases/toy-sd15.safetensors [--refine-decoder]] [--unet-from <a toy file>]

One thread and deterministic algorithms: the same seed on the same CPU writes the same weights. Trains the shared
VAE first (then refines its decoder alone), then each base's UNet, writes toy-<layout>.safetensors (A1111 layout, fp16) and prints how often the
base draws the figure and colour its prompt asks for.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.models.load import load_base  # noqa: E402
from trainer.models.single_file import save_single_file  # noqa: E402
from trainer.toy import pretrain as P  # noqa: E402
from trainer.toy.measure import CFG, prompt_following  # noqa: E402
from trainer.toy.world import FIGURES, PATTERNS, RESERVED_PATTERNS, RESERVED_SHAPES, sample_scene  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "trainer" / "toy" / "bases")
    ap.add_argument("--only", choices=sorted(P.LAYOUTS), action="append")
    for f in fields(P.Recipe):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--vae-from", type=Path, help="take the (already normalised) VAE of this toy checkpoint instead "
                    "of training one (saves the VAE stage; both bases share the VAE; --unet-steps 0 writes a file with only the VAE trained)")
    ap.add_argument("--refine-decoder", action="store_true", help="also refine the decoder of the --vae-from VAE "
                    "(--decoder-steps; its latents, and so any UNet trained on them, stay valid)")
    ap.add_argument("--check", type=int, default=24, help="prompts sampled to measure prompt following (0: none)")
    ap.add_argument("--unet-from", type=Path, help="continue the UNet and text encoders of this toy checkpoint (its "
                    "own VAE too) for --unet-steps more steps, with a fresh warm-up and cosine; needs one --only")
    ap.add_argument("--cfg", type=float, default=CFG, help="guidance scale of the prompt-following check")
    args = ap.parse_args(argv)
    if args.unet_from and (not args.only or len(args.only) != 1):
        ap.error("--unet-from continues one base: name it with --only sd15 or --only sdxl")
    args.vae_from = args.vae_from or args.unet_from
    recipe = P.Recipe(**{f.name: getattr(args, f.name) for f in fields(P.Recipe)})
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    say(f"recipe {recipe}")
    rng = random.Random(recipe.seed + 5)
    norm_scenes = [sample_scene(rng, FIGURES + RESERVED_SHAPES, PATTERNS + RESERVED_PATTERNS) for _ in range(512)]
    norm_data = P.pixels(norm_scenes)
    P.ROUND_TRIP_SCENES[:] = norm_scenes[:64]
    vae_state = P.skeleton("sd15", recipe.seed).vae
    if args.vae_from:  # a toy checkpoint's VAE is normalised (and fp16-rounded) already
        vae_state.load_state_dict({k: v.float() for k, v in load_base(args.vae_from).vae.state_dict().items()})
    else:
        P.train_vae(vae_state, recipe, say)
        P.normalize_latents(vae_state, norm_data)
        P.round_to_half(vae_state)  # the UNets learn the latents of the VAE the files hold
    if recipe.decoder_steps and (args.refine_decoder or not args.vae_from):
        P.refine_decoder(vae_state, recipe, say)  # the encoder, and so the latents, stay as they are
        P.round_to_half(vae_state)
    say(f"VAE round trip: {P.round_trip_accuracy(vae_state, norm_data[:64]):.0%} of 64 scenes read back right; "
        f"figure and colour of the prompt scenes: {P.prompt_scene_ceiling(vae_state):.0%}")
    args.out.mkdir(parents=True, exist_ok=True)
    for layout in args.only or sorted(P.LAYOUTS):
        base = P.skeleton(layout, recipe.seed)
        base.vae.load_state_dict(vae_state.state_dict())
        if args.unet_from:
            done = load_base(args.unet_from)
            base.unet.load_state_dict({k: v.float() for k, v in done.unet.state_dict().items()})
            for te, te_done in zip(base.text_encoders, done.text_encoders, strict=True):
                te.load_state_dict({k: v.float() for k, v in te_done.state_dict().items()})
        if recipe.unet_steps:
            P.train_unet(base, replace(recipe), say)
        path = save_single_file(base, args.out / f"toy-{layout}.safetensors", half=True,
                                metadata={"modelspec.title": f"toy-{layout}", "loraforge.config": f"toy-{layout}",
                                          "loraforge.toy_recipe": repr(recipe)})
        say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if args.check:
            acc, res = prompt_following(load_base(path), n=args.check, cfg=args.cfg)
            say(f"{layout}: figure and colour right in {acc:.0%} of {args.check} samples (cfg {args.cfg})")
            for r in res[:8]:
                say(f"  {r.scene.caption()!r} -> {r.reading.colour} {r.reading.figure} on {r.reading.background}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
