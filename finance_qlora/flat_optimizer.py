"""One optimizer update for all adapter weights instead of one per weight.

bitsandbytes' 8-bit AdamW updates parameter by parameter: for q/v adapters on 32 layers, 128
Python calls and kernel launches a step, each for 65,536 numbers, which leave the GPU waiting
on the host (issue 19's profile: the optimizer phase of a 16-row step). Its update is
blockwise: the 8-bit states are quantized in blocks of 256 numbers, each with its own absmax,
and everything else is elementwise. Weights whose sizes are whole blocks therefore compute the
same when they lie end to end in one flat tensor: the same blocks, the same numbers, one call.

`flatten_adapters` lays the eligible weights of each parameter group end to end (each weight
becomes a view into the flat tensor, so the model sees the updates in place) and gives the
optimizer the flat tensor instead; before each step the weights' gradients are copied into
its gradient. Nothing computed changes (tests/test_flat_optimizer.py: bit for bit equal to
bitsandbytes' own per-weight updates; tests/test_flat_optimizer_cuda.py on a GPU).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# The benchmarks turn this off to time a step with bitsandbytes' per-weight updates beside it.
ENABLED = True

# bitsandbytes' block of 8-bit optimizer states (Optimizer2State.init_state, 0.50)
BLOCK = 256


class FlatGroup:
    """Weights of one parameter group, laid end to end in `flat` (their data are views)."""

    def __init__(self, members: list[torch.Tensor]):
        self.members = members
        total = sum(p.numel() for p in members)
        first = members[0]
        data = torch.empty(total, dtype=first.dtype, device=first.device)
        offset = 0
        for p in members:
            n = p.numel()
            data[offset : offset + n].copy_(p.data.reshape(-1))
            p.data = data[offset : offset + n].view_as(p)
            offset += n
        self.flat = torch.nn.Parameter(data, requires_grad=False)
        self.grad = torch.empty_like(data)

    def gather_grads(self) -> None:
        """The members' gradients into the flat one; none at all: the step skips it, as
        bitsandbytes skips a weight without a gradient."""
        grads = [p.grad for p in self.members]
        if all(g is None for g in grads):
            self.flat.grad = None
            return
        if any(g is None for g in grads):
            # not for adapters (each of their weights takes part in every forward); kept defined:
            # a missing gradient counts as zero, where bitsandbytes would skip that weight
            log.warning(
                "some flattened weights have no gradient this step: counted as zero (their "
                "update then differs from bitsandbytes' per-weight one)"
            )
            pairs = zip(self.members, grads, strict=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in pairs]
        torch.cat([g.reshape(-1) for g in grads], out=self.grad)
        self.flat.grad = self.grad

    def unflatten(self) -> None:
        """Each weight back in its own storage (saving, later use of the model)."""
        for p in self.members:
            p.data = p.data.clone()


def _eligible(optimizer, p: torch.Tensor) -> bool:
    """A weight whose per-weight update is blockwise in whole blocks: 8-bit states (at least
    min_8bit_size numbers), a multiple of the block, a floating dense tensor."""
    args = optimizer.args
    return (
        p.requires_grad
        and p.is_floating_point()
        and p.layout == torch.strided
        and p.numel() >= args.min_8bit_size
        and p.numel() % BLOCK == 0
    )


def _whole_weight_settings(optimizer) -> bool:
    """Settings that look at a weight as a whole (clipping by a percentile of its gradient
    norms, an update-norm cap) or override one weight's config (bitsandbytes'
    GlobalOptimManager, a process-wide registry): then each weight stays alone."""
    args, overridden = optimizer.args, optimizer.mng.pid2config
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return (
        getattr(args, "percentile_clipping", 100) < 100  # older bitsandbytes
        or not getattr(args, "block_wise", True)  # older bitsandbytes: one absmax a weight
        or getattr(args, "max_unorm", 0.0) > 0
        or args.optim_bits != 8
        or any(id(p) in overridden for p in params)
    )


_FLAT: dict[type, type] = {}


def _flat_class(base: type) -> type:
    """`base` whose step gathers the flat gradients first (one subclass per class, kept under
    its own name here so that the optimizer still pickles)."""
    if base not in _FLAT:

        class Flat(base):
            def step(self, closure=None):
                for group in self.flat_groups:
                    group.gather_grads()
                return super().step(closure)

        name = f"Flat{base.__name__}"
        Flat.__name__ = Flat.__qualname__ = name
        globals()[name] = _FLAT[base] = Flat
    return _FLAT[base]


def flatten_adapters(optimizer) -> int:
    """Lay the eligible weights of each of a bitsandbytes 8-bit optimizer's parameter groups end
    to end, before its first step. Returns how many weights were flattened (0: unchanged)."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return 0
    if not ENABLED or not isinstance(optimizer, Optimizer8bit) or optimizer.state:
        return 0
    if _whole_weight_settings(optimizer):
        return 0
    flat_groups, flattened = [], 0
    for group in optimizer.param_groups:
        members = [p for p in group["params"] if _eligible(optimizer, p)]
        kinds = {(p.device, p.dtype) for p in members}
        if len(members) < 2 or len(kinds) > 1:
            continue
        flat = FlatGroup(members)
        ids = {id(p) for p in members}
        group["params"] = [flat.flat] + [p for p in group["params"] if id(p) not in ids]
        flat_groups.append(flat)
        flattened += len(members)
    if not flat_groups:
        return 0
    # bitsandbytes pages the states of weights of 100,000 numbers or more (managed memory, a
    # wait at the end of each step); the adapters' own states were not paged: neither are the
    # flat tensor's.
    optimizer.is_paged = False
    optimizer.flat_groups = flat_groups
    optimizer.__class__ = _flat_class(type(optimizer))
    return flattened


def unflatten_adapters(optimizer) -> None:
    """Each flattened weight back in its own storage (at the end of training)."""
    for group in getattr(optimizer, "flat_groups", ()):
        group.unflatten()
