"""TensorBoard logs next to `loss.json` (`outputs/tensorboard/`), under kohya's tags: `loss/current` (each step's
loss), `loss/average` (the smoothed loss the progress bar shows) and `lr/unet`; the samples as images under
`sample/<prompt index>` at the step they were rendered (as OneTrainer shows them; kohya sends samples only to wandb).

Written only when the optional `tensorboard` package is installed (`pip install loraforge[tensorboard]`): it is
large (~60 MB with its protobuf and gRPC dependencies) and only TensorBoard users need it. `tensorboard --logdir
<job>/outputs/tensorboard` then shows the run; a resumed run adds its steps to the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLog:
    def __init__(self, folder: Path, from_step: int, window: int):
        self.writer: Any = None
        self.last_step = from_step  # steps up to here are already in the folder (a resume)
        self.window = window
        try:
            from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package
        except ImportError:
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def write(self, history: list[list[float]], lr: float | None) -> None:
        """Every step of `history` ([step, loss]) not written yet, and the learning rate at the newest one."""
        if self.writer is None or not history:
            return
        losses = [v for _, v in history]
        for i, (step, loss) in enumerate(history):
            if step <= self.last_step:
                continue
            recent = losses[max(0, i + 1 - self.window): i + 1]
            self.writer.add_scalar("loss/current", loss, int(step))
            self.writer.add_scalar("loss/average", sum(recent) / len(recent), int(step))
        newest = int(history[-1][0])
        if lr is not None and newest > self.last_step:
            self.writer.add_scalar("lr/unet", lr, newest)
        self.last_step = max(self.last_step, newest)
        self.writer.flush()

    def samples(self, step: int, paths: list[str]) -> None:
        """Each rendered sample image, tagged by its prompt index, at `step`."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for i, p in enumerate(paths):
            if Path(p).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp") or not Path(p).is_file():
                continue  # a sample hook may hand back other files
            with Image.open(p) as im:
                pixels = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"sample/{i:02d}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
