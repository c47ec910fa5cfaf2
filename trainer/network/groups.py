"""What every trainable network (LoRA/LoCon in trainer.network.lora, the LyCORIS types in
trainer.network.lycoris_net) says the same way: its parameters split into UNet and text-encoder ones, which models
it trains, and the optimizer groups (the text encoders at their own rate)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from trainer.network.targets import Target


class TrainableNetwork:
    """A mixin: the network gives `_params(te)` and `targets()`; this adds the rest."""

    def _params(self, te: bool) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def targets(self) -> list[Target]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self._params(te=False), *self._params(te=True)]

    @property
    def trains_unet(self) -> bool:
        return any(t.model == "unet" for t in self.targets())

    @property
    def trains_text_encoder(self) -> bool:
        return any(t.model != "unet" for t in self.targets())

    def param_groups(self, unet_lr: float, te_lr: float | None = None) -> list[dict]:
        """Optimizer groups: {"name": "unet", ...} and, only when a text encoder is trained, {"name": "te", ...}."""
        groups = []
        unet = list(self._params(te=False))
        if unet:
            groups.append({"name": "unet", "params": unet, "lr": unet_lr})
        te = list(self._params(te=True))
        if te:
            groups.append({"name": "te", "params": te, "lr": unet_lr if te_lr is None else te_lr})
        return groups
