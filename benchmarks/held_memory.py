"""What a training leaves on the GPU: one setting trained several times in one process (each
training a new model, as in a worker that runs flow after flow), with the CUDA allocator's
block states recorded (`torch.cuda.memory._record_memory_history`, "state": each live block
with the Python stack that allocated it).

    python benchmarks/held_memory.py --data finance_alpaca_sample.jsonl --trainings 4

After each training and its release: the memory still allocated, each training's speed, the
blocks alive that came since the previous training's end, grouped by where they were
allocated (a block is new unless one of the same address and size was alive before), and for
the largest the Python tensors on them and what keeps those alive.
Results: <out>/held-memory-<gpu>-<date><tag>.json.
"""

from __future__ import annotations

import gc
import sys
import types
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_throughput import runner  # noqa: E402
from benchmarks.result_file import result_path, stamp, write_json  # noqa: E402
from benchmarks.variants import TRAIN_VARIANTS  # noqa: E402
from benchmarks.workload import GIB, Setup, one_variant_parser, release  # noqa: E402

MIB = 1024**2


def live_blocks() -> dict[tuple[int, int], list[dict]]:
    """(address, size) -> the allocating Python frames, innermost first, of every live block."""
    blocks = {}
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                blocks[(block["address"], block["size"])] = block.get("frames", [])
    return blocks


def where(frames: list[dict], depth: int = 14) -> list[str]:
    return [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:depth]]


def grouped(blocks: dict[tuple[int, int], list[dict]]) -> list[dict]:
    """The blocks by allocating stack, the largest total first."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for (_, size), frames in blocks.items():
        groups[tuple(where(frames))].append(size)
    rows = [
        {"mib": round(sum(s) / MIB, 1), "blocks": len(s), "stack": list(stack)}
        for stack, s in groups.items()
    ]
    return sorted(rows, key=lambda r: -r["mib"])


def describe(obj) -> str:
    if isinstance(obj, dict):
        return f"dict keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple, set)):
        return f"{type(obj).__name__} of {len(obj)}"
    if isinstance(obj, types.FunctionType):
        return f"function {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return f"method {obj.__func__.__qualname__}"
    return type(obj).__module__ + "." + type(obj).__qualname__


def paths_up(start, ignore: set[int], depth: int = 12, limit: int = 3000) -> list[list[str]]:
    """What keeps `start` alive: breadth-first up its referrers (frames and the lists this
    script made left out) to an object nothing but those refers to, or to a module's globals;
    each path as descriptions, `start` first."""
    parents: dict[int, int | None] = {id(start): None}
    nodes = {id(start): start}
    queue, ends = [start], []
    ups: list = []
    while queue and len(nodes) < limit and len(ends) < 4:
        obj = queue.pop(0)
        ups.clear()  # the last round's list refers to what it held
        ups = [
            r
            for r in gc.get_referrers(obj)
            if id(r) not in ignore
            and not isinstance(r, types.FrameType)
            and r is not queue
            and r is not ups
            and r is not nodes
        ]
        is_globals = isinstance(obj, dict) and "__name__" in obj and "__loader__" in obj
        if is_globals or not ups:
            ends.append(id(obj))
            continue
        for r in ups:
            if id(r) not in nodes and len(path_of(parents, id(obj))) < depth:
                nodes[id(r)], parents[id(r)] = r, id(obj)
                queue.append(r)
    result = []
    for end in ends:
        names = [describe(nodes[i]) for i in path_of(parents, end)]
        if isinstance(nodes[end], dict) and "__loader__" in nodes[end]:
            names[0] = f"globals of {nodes[end]['__name__']}"
        result.append(list(reversed(names)))
    return result


def path_of(parents: dict[int, int | None], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])
    return path


def holders(address: int, size: int, limit: int = 2) -> list[dict]:
    """The Python tensors whose storage lies in the block, and what keeps each alive."""
    everything = gc.get_objects()
    tensors = []
    for obj in everything:
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            try:
                pointer = obj.untyped_storage().data_ptr()
            except Exception:  # noqa: BLE001 - fake and meta tensors have no storage
                continue
            if address <= pointer < address + size:
                tensors.append(obj)
    ignore = {id(everything), id(tensors)}
    found = [
        {
            "tensor": f"{tuple(t.shape)} {t.dtype} {type(t).__name__}",
            "kept_by": paths_up(t, ignore),
        }
        for t in tensors[:limit]
    ]
    del everything, tensors
    return found


def cache_entries() -> dict[str, int]:
    """torch.compile's cache entries on the decoder layer's forward (a new entry per model
    would mean each training compiles again)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    codes = {"LlamaDecoderLayer.forward": LlamaDecoderLayer.forward.__code__}
    codes["Module._call_impl"] = torch.nn.Module._call_impl.__code__
    return {name: len(_debug_get_cache_entry_list(code)) for name, code in codes.items()}


def main() -> None:
    parser = one_variant_parser(__doc__.splitlines()[0], TRAIN_VARIANTS)
    parser.add_argument("--trainings", type=int, default=4)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "a CUDA device is needed"

    setup = Setup(args)
    run = runner(setup, args.variant, setup.config(train=TRAIN_VARIANTS[args.variant]), None)
    release()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="state", stacks="python")
    before = live_blocks()
    trainings = []
    for i in range(args.trainings):
        record = run(str(i))
        release()
        after = live_blocks()
        new = {k: v for k, v in after.items() if k not in before}
        largest = sorted(new, key=lambda k: -k[1])[:3]
        trainings.append(
            {
                "useful_tok_s": record["useful_tok_s"],
                "seconds": record["seconds"],
                "peak_gib": record["peak_gib"],
                "allocated_gib_after": round(torch.cuda.memory_allocated() / GIB, 3),
                "held_since_start_gib": round((torch.cuda.memory_allocated() - base) / GIB, 3),
                "new_blocks_mib": round(sum(k[1] for k in new) / MIB, 1),
                "new_blocks": grouped(new)[:10],
                "largest_holders": [
                    {"mib": round(k[1] / MIB, 1), "tensors": holders(*k)} for k in largest
                ],
                "cache_entries": cache_entries(),
            }
        )
        last = trainings[-1]
        print(
            f"training {i}: {last['useful_tok_s']:,.0f} tok/s, held since the start "
            f"{last['held_since_start_gib']} GiB, new blocks {last['new_blocks_mib']} MiB",
            flush=True,
        )
        before = after
    torch.cuda.memory._record_memory_history(enabled=None)
    result = stamp() | {
        "variant": args.variant,
        "settings": TRAIN_VARIANTS[args.variant],
        "trainings": trainings,
    }
    print(write_json(result_path(args.out, "held-memory", result, args.tag), result))


if __name__ == "__main__":
    main()
