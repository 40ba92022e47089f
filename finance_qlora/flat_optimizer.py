"""One optimizer update for all adapter weights instead of one per weight.

bitsandbytes' 8-bit AdamW updates parameter by parameter: for q/v adapters on 32 layers, 128
Python calls and kernel launches a step, each for 65,536 numbers, which leave the GPU waiting
on the host (issue 19's profile: the optimizer phase of a 16-row step). Its update is
blockwise: the 8-bit states are quantized in blocks (256 numbers in bitsandbytes 0.50), each
with its own absmax, and everything else is elementwise. Weights whose sizes are whole blocks
therefore compute the same when they lie end to end in one flat tensor: the same blocks, the
same numbers, one call.

`flatten_adapters` lays the eligible weights of each parameter group end to end (each weight
becomes a view into the flat tensor, so the model sees the updates in place; they stay views,
which PEFT's saving handles) and gives the optimizer the flat tensor instead; before each step
the weights' gradients are copied into its gradient (a second copy of the adapters' gradients,
34 MB for q/v on a 7B model). Nothing computed changes (tests/test_flat_optimizer.py: bit for
bit equal to bitsandbytes' own per-weight updates, also through a checkpoint and a resume;
tests/test_flat_optimizer_cuda.py on a GPU).

Not flattened, each weight then updated alone as before: fp16 training (the loss scaler
unscales and checks the optimizer's own gradients, which the flat one gets only in `step`),
settings that look at a whole weight or override one weight's config, weights not whole blocks.
A checkpoint's optimizer state holds the flat tensor: a resume needs the same layout (training
folders are keyed by the training code, so a checkpoint of other code is never resumed).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# The benchmarks turn this off to time a step with bitsandbytes' per-weight updates beside it.
ENABLED = True


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
        self.storage = data.untyped_storage().data_ptr()

    def gather_grads(self) -> None:
        """The members' gradients into the flat one; none at all: the step skips it, as
        bitsandbytes skips a weight without a gradient."""
        if any(p.untyped_storage().data_ptr() != self.storage for p in self.members):
            # a weight's data replaced after flattening would silently never be updated
            raise RuntimeError(
                "a flattened adapter weight no longer lies in the optimizer's flat tensor "
                "(its .data was replaced after the optimizer was made)"
            )
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


def state_block(optimizer, group: dict) -> int:
    """The numbers in one block of this bitsandbytes' 8-bit states, read from its own
    init_state on a throwaway weight (0: not blockwise)."""
    probe = torch.nn.Parameter(torch.zeros(1 << 16, device=group["params"][0].device))
    try:
        optimizer.init_state(group, probe, 0, 0)
        absmax = optimizer.state[probe].get("absmax1")
        return probe.numel() // absmax.numel() if absmax is not None else 0
    finally:
        optimizer.state.pop(probe, None)


def _overridden(optimizer) -> set[int]:
    """ids of weights with their own config in bitsandbytes' process-wide manager: set
    directly, or through a module (the Trainer asks 32-bit states for embeddings that way,
    resolved only at the first step)."""
    manager = optimizer.mng
    by_module = {id(getattr(m, attr, None)) for m, attr, _ in manager.module_weight_config_triple}
    return set(manager.pid2config) | by_module


def _whole_weight_settings(optimizer) -> bool:
    """Settings that look at a weight as a whole (clipping by a percentile of its gradient
    norms, an update-norm cap), or configs kept by position (bitsandbytes' index2config, which
    a flat tensor at another position would not get): then each weight stays alone."""
    args = optimizer.args
    return (
        getattr(args, "percentile_clipping", 100) < 100  # older bitsandbytes
        or not getattr(args, "block_wise", True)  # older bitsandbytes: one absmax a weight
        or getattr(args, "max_unorm", 0.0) > 0
        or args.optim_bits != 8
        or bool(optimizer.mng.index2config)
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


def flatten_adapters(optimizer, scaled: bool = False) -> int:
    """Lay the eligible weights of each of a bitsandbytes 8-bit optimizer's parameter groups end
    to end, before its first step; `scaled`: a loss scaler (fp16) steps this optimizer, so
    nothing is flattened. Returns how many weights were flattened (0: unchanged)."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return 0
    if not ENABLED or scaled or not isinstance(optimizer, Optimizer8bit) or optimizer.state:
        return 0
    if _whole_weight_settings(optimizer):
        return 0
    overridden = _overridden(optimizer)
    min_8bit = optimizer.args.min_8bit_size
    flat_groups, flattened = [], 0
    for gindex, group in enumerate(optimizer.param_groups):
        if not group["params"] or not (block := state_block(optimizer, group)):
            continue
        members = [
            p
            for p in group["params"]
            if p.requires_grad
            and p.is_floating_point()
            and p.layout == torch.strided
            and id(p) not in overridden
            and p.numel() >= min_8bit  # 8-bit states (smaller weights get 32-bit ones)
            and p.numel() % block == 0
        ]
        if len(members) < 2 or len({(p.device, p.dtype) for p in members}) > 1:
            continue
        flat = FlatGroup(members)
        ids = {id(p) for p in members}
        group["params"] = [flat.flat] + [p for p in group["params"] if id(p) not in ids]
        # States made now, unpaged: the adapters' own were not paged either (bitsandbytes pages
        # weights of 100,000 numbers or more), and paging would add a wait to every step. The
        # other weights keep the optimizer's paging.
        paged, optimizer.is_paged = optimizer.is_paged, False
        try:
            optimizer.init_state(group, flat.flat, gindex, 0)
        finally:
            optimizer.is_paged = paged
        flat_groups.append(flat)
        flattened += len(members)
    if not flat_groups:
        return 0
    optimizer.flat_groups = flat_groups
    optimizer.__class__ = _flat_class(type(optimizer))
    return flattened
