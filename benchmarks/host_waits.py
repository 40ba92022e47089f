"""Where a training step makes the host wait for the GPU: a TrainerCallback that, over a few
optimizer steps, counts CUDA's synchronizing calls (torch.cuda.set_sync_debug_mode: item(),
blocking copies, ...) and explicit torch.cuda.synchronize() calls, each by the library line
that made it. Used by gpu_throughput.py (--host-waits) beside the step timings."""

from __future__ import annotations

import traceback
import warnings
from collections import Counter

import torch

# The libraries whose lines name a wait (the innermost frame in one of them).
LIBRARIES = ("finance_qlora", "trl", "transformers", "accelerate", "peft", "bitsandbytes")


def call_site(stack: list[traceback.FrameSummary]) -> str:
    for frame in reversed(stack):
        parts = frame.filename.replace("\\", "/").split("/")
        for library in LIBRARIES:
            if library in parts:
                tail = "/".join(parts[parts.index(library) :])
                return f"{tail}:{frame.lineno} {frame.name}"
    return "elsewhere"


def host_waits(into: dict, first_step: int = 2, last_step: int = 5):
    """Counts waits from the start of step `first_step` + 1 to the end of `last_step` (each
    step's batch fetch included); writes {"steps", "per_step", "sites"} into `into`."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        sites: Counter | None = None

        def _record(self, kind: str) -> None:
            self.sites[f"{kind}: {call_site(traceback.extract_stack()[:-2])}"] += 1

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step != first_step or not torch.cuda.is_available():
                return
            self.sites = Counter()
            self.saved = warnings.showwarning, torch.cuda.synchronize
            synchronize = torch.cuda.synchronize

            def counted_synchronize(*a, **k):
                self._record("torch.cuda.synchronize")
                return synchronize(*a, **k)

            def shown(message, category, filename, lineno, file=None, line=None):
                if "synchronizing" in str(message):
                    self._record("sync")
                else:
                    self.saved[0](message, category, filename, lineno, file, line)

            self.filters = warnings.catch_warnings()
            self.filters.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = shown
            torch.cuda.synchronize = counted_synchronize
            torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if self.sites is None or state.global_step != last_step:
                return
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, torch.cuda.synchronize = self.saved
            self.filters.__exit__(None, None, None)
            steps = last_step - first_step
            into.update(
                steps=steps,
                per_step=round(sum(self.sites.values()) / steps, 1),
                sites={site: n / steps for site, n in self.sites.most_common()},
            )
            self.sites = None

    return Callback()
