"""Pretraining loader throughput: samples per second that ``mass pretrain``'s DataLoader delivers.

    python benchmarks/loader_throughput.py -d 940 [-p nnUNetResEncUNetMPlans] [-c 3d_fullres] [--patch 128 128 128]
           [--max-tasks 13] [--batch-size 2] [-np 2] [--batches 12] [--pin]

The sampler and the stream of ``mass pretrain`` (``BatchStream.loader``: persistent workers, batches as the workers
send them, pinned with ``--pin`` as on CUDA), on the dataset's proposals; the first batch (workers starting) is not
timed. Prints samples per second, the main process's CPU seconds and the bytes of one batch. Nothing is trained:
on a GPU machine this is the rate a training step must not outrun (benchmarks/gpu_check.sh runs it).
"""
from __future__ import annotations

import time

from _common import build_sampler, plans_parser  # benchmarks/_common.py (the script's folder is on sys.path)


def main() -> None:
    parser = plans_parser(__doc__, "planned dataset with proposals")
    parser.add_argument("--patch", type=int, nargs="+", default=[128, 128, 128], help="0: the plans' patch")
    parser.add_argument("--max-tasks", type=int, default=13)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("-np", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--pin", action="store_true", help="pin_memory, as mass pretrain does on CUDA")
    args = parser.parse_args()

    import torch

    from mass_nnu.pretraining.sampling import BatchStream
    from mass_nnu.workspace import configure_environment

    configure_environment(quiet=True)
    torch.set_num_threads(1)
    sampler = build_sampler(args)
    loader = iter(BatchStream(sampler, args.batch_size, args.batches, 0).loader(0, args.np, pin_memory=args.pin))
    first = next(loader)  # workers started
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(loader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    batch_mib = sum(v.numel() * v.element_size() for v in first.values()) / 2 ** 20
    print(f"loader: {args.np} workers, patch {list(sampler.patch_size)}, batch {args.batch_size}, pinned {args.pin}: "
          f"{args.batches * args.batch_size / wall:.2f} samples/s ({wall / args.batches:.3f} s/batch), main-process "
          f"CPU {cpu / args.batches:.3f} s/batch, {batch_mib:.0f} MiB per batch")


if __name__ == "__main__":
    main()
