"""Holds all of a GPU's memory but MIB mebibytes (default 80,000: an 80 GB card's share, with
room for its driver's reserve) until killed, so that a run beside it sees a smaller GPU.

    python3 benches/hold_gpu_memory.py [MIB] &
    sweep bench sweeps/bench-1b.ron --device cuda --set train.seq_len=4096 ...
    kill %1

Prints what it holds and what is left free once it holds it.
"""

import sys
import time

import torch


def main() -> None:
    keep_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 80_000
    free, total = torch.cuda.mem_get_info()
    hold = free - keep_mib * 2**20
    if hold <= 0:
        sys.exit(f"only {free / 2**20:.0f} MiB are free: nothing to hold for {keep_mib} MiB")
    held = torch.empty(hold, dtype=torch.uint8, device="cuda")
    left, _ = torch.cuda.mem_get_info()
    print(
        f"holding {hold / 2**30:.1f} GiB, {left / 2**20:.0f} MiB free of {total / 2**20:.0f}",
        flush=True,
    )
    while held is not None:
        time.sleep(60)


if __name__ == "__main__":
    main()
