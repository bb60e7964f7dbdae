"""The continuous batcher's decode step beside a busy Python thread, at Python's 5 ms switch interval and
at the serve app's 0.5 ms (``gil_switch_interval_ms``): what a replica's event loop can cost its scheduler
thread, in one process, no HTTP.

    python3 bench/serve_gil.py        # CPU, ~1 minute: bench/serve_http.py's --cpu32 model, 32 sequences

The scheduler gives up the interpreter lock at every torch call; a neighbour thread that runs Python
keeps it until the switch interval forces it out. Two neighbours: one that never pauses, and one that
runs Python 0.5 ms at a time and then waits 1 ms (an event loop between I/O waits). Prints a line per
configuration; figures from a shared 2-core machine are noisy.
"""

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import serve_http as sh  # noqa: E402


def busy(stop: list[bool]) -> None:
    total = 0
    while not stop[0]:
        for i in range(1000):
            total += i * i


def bursts(stop: list[bool], work_s: float = 0.0005, rest_s: float = 0.001) -> None:
    while not stop[0]:
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:
            pass
        time.sleep(rest_s)


def main() -> None:
    from oppu.serving.engine import GenerationEngine, LoraSlotsConfig

    torch.set_num_threads(1)
    shape = sh.HttpShape(**(sh.CPU32.__dict__ | {"phase_s": 6.0}))
    tokenizer = sh.word_tokenizer(shape.vocab)
    engine = GenerationEngine(sh.random_llama(shape, tokenizer, "cpu"), tokenizer,
                              LoraSlotsConfig(shape.gpu_slots, shape.rank, sh.SERVED_MODULES))
    workload = sh.Workload(shape, seed=0)
    for label, neighbour, interval in [("alone", None, 0.005), ("never-pausing thread, 5 ms", busy, 0.005),
                                       ("never-pausing thread, 0.5 ms", busy, 0.0005),
                                       ("bursts of 0.5 ms, 5 ms", bursts, 0.005),
                                       ("bursts of 0.5 ms, 0.5 ms", bursts, 0.0005)]:
        sys.setswitchinterval(interval)
        stop = [False]
        thread = threading.Thread(target=neighbour, args=(stop,), daemon=True) if neighbour else None
        if thread:
            thread.start()
        result = sh.engine_closed_loop(engine, workload, 32, shape.phase_s, label)
        stop[0] = True
        if thread:
            thread.join()
        print(f"{label:32s} decode {result['decode_ms_per_step']:7.1f} ms a step, "
              f"{result['tokens_per_s']:6.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
