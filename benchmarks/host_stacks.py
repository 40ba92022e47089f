"""Where the host's time goes in warm training steps: py-spy samples the Python stacks of every
thread of this process while one setting trains (after a warm-up run in the same process, so
no compile is sampled), then the samples are summed by function and by line, thread by thread.

    pip install py-spy
    python benchmarks/host_stacks.py --data finance_alpaca_sample.jsonl --runs 2

py-spy reads this process's memory from outside (no code in the process, sampling without
pausing it: `--nonblocking`), so it needs ptrace of the process: Linux, the same user; the
process allows any tracer of its user (Yama's ptrace_scope 1 only allows ancestors). A thread
waiting (on a lock, the GPU, the autograd engine) is not sampled: each thread's samples are its
busy time. Results: <out>/host-stacks-<gpu>-<date><tag>.json and the raw samples beside it
(py-spy's "raw" format: one stack a line, frames outermost first, then the count; kept in the
repository gzipped). `python benchmarks/host_stacks.py --again RESULT.json` sums them again.
"""

from __future__ import annotations

import ctypes
import gzip
import json
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.result_file import result_path, stamp, write_json  # noqa: E402

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")
PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, -1


def parse(raw: str) -> dict[str, list[tuple[list[tuple[str, str, int]], int]]]:
    """py-spy's raw lines -> {thread: [(frames outermost first as (function, file, line),
    count)]}."""
    threads: dict[str, list] = defaultdict(list)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        names = stack.split(";")
        thread = names.pop(0) if names and names[0].startswith("thread (") else "?"
        frames = []
        for name in names:
            match = FRAME.match(name)
            if match:
                frames.append((match["function"], match["file"], int(match["line"])))
            else:  # a frame without a file
                frames.append((name, "", 0))
        threads[thread].append((frames, int(count)))
    return threads


def short(path: str) -> str:
    """The path from its package on (site-packages/x/y.py -> x/y.py)."""
    for marker in ("site-packages/", "dist-packages/", "/work/", "/tmp/site/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarize(
    raw: str, rate: float, steps: int, within: str = "_inner_training_loop", top: int = 80
) -> list[dict]:
    """Per thread, busiest first: busy milliseconds a step, and the functions (inclusive: a
    sample counts once for every function on its stack) and lines (self: the innermost frame)
    that took most of its samples, with each line's source where this machine has the file.
    The main thread's samples count only within the function `within` (the steps, not the
    model's build and release around each run); every other thread's all count: the autograd
    engine's, which runs the backward, and any other busy in the window (a model load's copy
    threads, the data loader's pinning thread), each reported apart."""
    threads = []
    for thread, stacks in parse(raw).items():
        if thread.endswith("MainThread"):
            # py-spy names a method Class.method
            inside = [any(n.rsplit(".", 1)[-1] == within for n, _, _ in f) for f, _ in stacks]
            stacks = [stack for stack, keep in zip(stacks, inside, strict=True) if keep]
        if not stacks:
            continue
        samples = sum(count for _, count in stacks)
        inclusive: Counter = Counter()
        own: Counter = Counter()
        for frames, count in stacks:
            # each function once a sample, in stack order (ties then sort the same every time)
            for key in dict.fromkeys((function, file) for function, file, _ in frames):
                inclusive[key] += count
            if frames:
                own[frames[-1]] += count
        threads.append(
            {
                "thread": thread,
                "samples": samples,
                "busy_ms_a_step": round(1000 * samples / rate / max(steps, 1), 2),
                "inclusive": [
                    {"share": round(n / samples, 4), "function": f, "file": short(p)}
                    for (f, p), n in inclusive.most_common(top)
                ],
                "self": [
                    {
                        "share": round(n / samples, 4),
                        "function": f,
                        "at": f"{short(p)}:{line}",
                        "source": linecache.getline(p, line).strip() if line else "",
                    }
                    for (f, p, line), n in own.most_common(top)
                ],
            }
        )
    return sorted(threads, key=lambda t: -t["samples"])


def keep_compiled_code(threads: list[dict], folder: Path) -> None:
    """Copy the inductor-generated files the busiest lines are in (the compiled layers' forward
    and backward: the lines' sources are read against them)."""
    for thread in threads[:3]:
        for row in thread["self"]:
            path = Path(row["at"].rsplit(":", 1)[0])
            if "torchinductor" in str(path) and path.exists():
                folder.mkdir(exist_ok=True)
                shutil.copy(path, folder / path.name)


def allow_tracing() -> None:
    """Let a tracer that is not this process's ancestor read it (Yama; no-op without it)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def summarize_again(kept: Path) -> None:
    """Sum a kept result's raw samples again (after a change to summarize), keeping the source
    lines it read on its own machine where this one lacks the files."""
    result = json.loads(kept.read_text())
    sources = {
        row["at"]: row["source"] for t in result["threads"] for row in t["self"] if row["source"]
    }
    raw = kept.with_suffix(".txt")
    text = (
        gzip.decompress(raw.with_suffix(".txt.gz").read_bytes()).decode()
        if not raw.exists()
        else raw.read_text()
    )
    result["threads"] = summarize(text, result["rate"], result["steps_sampled"])
    for thread in result["threads"]:
        for row in thread["self"]:
            row["source"] = row["source"] or sources.get(row["at"], "")
    write_json(kept, result)


def main() -> None:
    if sys.argv[1:2] == ["--again"]:
        return summarize_again(Path(sys.argv[2]))

    from benchmarks.gpu_throughput import runner
    from benchmarks.variants import TRAIN_VARIANTS
    from benchmarks.workload import Setup, one_variant_parser, release

    parser = one_variant_parser(__doc__.splitlines()[0], TRAIN_VARIANTS)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rate", type=int, default=500, help="samples a second")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    assert spy, "py-spy is needed: pip install py-spy"

    setup = Setup(args)
    run = runner(setup, args.variant, setup.config(train=TRAIN_VARIANTS[args.variant]), None)
    warm = run("warmup")
    release()
    stamped = stamp()
    raw_path = result_path(args.out, "host-stacks", stamped, args.tag, suffix=".txt")
    allow_tracing()
    record = [spy, "record", "--pid", str(os.getpid()), "--rate", str(args.rate)]
    record += ["--format", "raw", "--threads", "--nonblocking", "--full-filenames"]
    spying = subprocess.Popen([*record, "-o", str(raw_path)])
    time.sleep(3)  # attached
    if spying.poll() is not None:
        raise SystemExit(f"py-spy could not sample this process (exit {spying.returncode})")
    try:
        started = time.perf_counter()
        timed = [run(str(i)) for i in range(args.runs)]
        window = time.perf_counter() - started
    finally:  # py-spy writes its samples when interrupted
        spying.send_signal(signal.SIGINT)
        spying.wait(timeout=120)
    steps = sum(t["steps"] for t in timed)
    result = stamped | {
        "variant": args.variant,
        "settings": TRAIN_VARIANTS[args.variant],
        "rate": args.rate,
        "steps_sampled": steps,
        "train_seconds": [t["seconds"] for t in timed],
        "useful_tok_s": [t["useful_tok_s"] for t in timed],
        "warmup_useful_tok_s": warm["useful_tok_s"],
        # the window also holds each run's model build and release, not only its steps
        "window_seconds": round(window, 2),
        "threads": summarize(raw_path.read_text(), args.rate, steps),
    }
    path = write_json(raw_path.with_suffix(".json"), result)
    keep_compiled_code(result["threads"], raw_path.with_suffix(""))
    for thread in result["threads"][:3]:
        print(thread["thread"], thread["busy_ms_a_step"], "ms a step")
        for row in thread["inclusive"][:25]:
            print(f"  {row['share']:.3f} {row['function']} {row['file']}")
    print(path)


if __name__ == "__main__":
    main()
