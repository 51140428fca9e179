"""Statistics of the inputs of linear layers over calibration forwards, by forward hooks: the
OBS compensation's Gram matrices (:mod:`effllm.models.pruning`) and Wanda's input norms
(:mod:`effllm.inference.techniques`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class InputStats:
    """``sum stat(X)`` (fp32, X the inputs flattened to [tokens, features]) of each chosen
    linear layer over the forwards while it is open; :meth:`close` removes the hooks and
    returns the sums by name."""

    def __init__(self, modules: dict[str, nn.Linear],
                 stat: Callable[[torch.Tensor], torch.Tensor]):
        self.stat, self.sums = stat, {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            value = self.stat(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            self.sums[name] = self.sums[name] + value if name in self.sums else value

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return self.sums
