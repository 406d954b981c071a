"""Adam for the per-pair optimisations at registration time (the affine stage, test-time refinement).

``torch.optim``'s first ``step`` imports ``torch._dynamo``: 2.2 s on a 2-core CPU, more than the whole
registration, paid by every fresh ``acsgreg register`` process. These optimisations have a handful of
tensors and run for tens of steps, so the update is written out here, the same as ``torch.optim.Adam``'s
default (no weight decay, no AMSGrad; a test checks both give the same steps). Training keeps torch.optim.
"""

from typing import Dict, Iterable, List, Sequence, Union

import torch

ParamGroups = Union[Sequence[torch.Tensor], Sequence[Dict]]


class Adam:
    """``Adam(params, lr)`` or ``Adam([{"params": [...], "lr": ...}, ...])``, with ``zero_grad`` and ``step``."""

    def __init__(self, params: ParamGroups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.groups: List[Dict] = [{"params": list(g["params"]), "lr": float(g.get("lr", lr))} for g in groups]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in self._parameters()}

    def _parameters(self) -> Iterable[torch.Tensor]:
        for group in self.groups:
            yield from group["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._parameters():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        correction1 = 1.0 - self.beta1 ** self.steps
        root_correction2 = (1.0 - self.beta2 ** self.steps) ** 0.5
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                mean, square = self.moments[id(p)]
                mean.lerp_(p.grad, 1.0 - self.beta1)
                square.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1.0 - self.beta2)
                denominator = (square.sqrt() / root_correction2).add_(self.eps)
                p.addcdiv_(mean, denominator, value=-group["lr"] / correction1)
