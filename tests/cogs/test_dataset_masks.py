"""/dataset takes loss masks by the engine's convention (storage/masks.py): `<image>-masklabel.png` beside its
image, or `masks/<image name>` inside a zip (also for an image uploaded earlier); a mask without its image or of
another size is refused with a reason; /train on the dataset then trains with masked loss on a snapshot whose
mask folder the engine reads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from cogkit import answer, png_bytes, run_command
from PIL import Image


def mask_png(size: tuple[int, int]) -> bytes:
    img = Image.new("L", size, 0)
    img.paste(255, (0, 0, size[0] // 2, size[1]))  # learn the left half
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def test_masks_pair_with_their_images_and_masked_loss_trains_on_them(fake_discord, bot):
    fake = fake_discord
    opts = {f"file{i + 1}": fake.add_attachment(f"img{i}.png", png_bytes((40 * i, 90, 200))) for i in range(3)}
    opts["file4"] = fake.add_attachment("img0-masklabel.png", mask_png((72, 72)))
    opts["file5"] = fake.add_attachment("img9-masklabel.png", mask_png((72, 72)))
    opts["file6"] = fake.add_attachment("img1-masklabel.png", mask_png((96, 72)))
    rec = await run_command(fake, bot, "dataset", {"name": "masked", **opts}, user="bob", subcommand="create")
    text = answer(rec)
    assert "added 3 image(s)" in text, text
    assert "1 mask(s) paired with their images" in text, text
    assert ("`img9-masklabel.png`: is a mask, but no image named `img9` came with it or is in the dataset; "
            "upload the image too") in text, text
    assert ("`img1-masklabel.png`: is 96x72 but its image `img1.png` is 72x72: a mask must be exactly the size "
            "of its image") in text, text

    # A mask for an image stored earlier, in a zip's masks folder (kohya's separate mask folder).
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("masks/img2.png", mask_png((72, 72)))
    rec = await run_command(fake, bot, "dataset", {"dataset": "masked",
                                                   "file1": fake.add_attachment("more.zip", buf.getvalue())},
                            user="bob", subcommand="add")
    assert "1 mask(s) paired" in answer(rec) and "added 0 image(s)" in answer(rec), answer(rec)

    rec = await run_command(fake, bot, "train", {"dataset": "masked", "steps": 2, "output_name": "m"}, user="bob")
    assert "Queued job" in answer(rec), answer(rec)
    spec = (await bot.repo.list_jobs())[0].spec
    assert spec["masked_loss"] is True
    [concept] = spec["concepts"]
    masks, images = Path(concept["mask_dir"]), Path(concept["image_dir"])
    stems = {p.stem: p for p in images.iterdir() if p.suffix == ".png"}
    assert sorted(p.stem for p in masks.iterdir()) == sorted(stems)  # one mask per image, as the engine wants
    rows = {r.original_name: r for r in await bot.repo.list_images((await bot.repo.list_datasets())[0].id)}
    assert (masks / f"{rows['img0.png'].sha256}.png").read_bytes() == mask_png((72, 72))
    assert (masks / f"{rows['img2.png'].sha256}.png").read_bytes() == mask_png((72, 72))
    white = Image.open(masks / f"{rows['img1.png'].sha256}.png")  # no mask: counts everywhere
    assert white.convert("L").getextrema() == (255, 255)
