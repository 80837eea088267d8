"""Running a module in eval mode for a while (no dropout while sampling, scoring or calibrating), or for good."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; its train/eval mode is restored after, even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter frozen (a reference or a teacher), returned."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
