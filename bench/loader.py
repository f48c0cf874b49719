"""Benchmark ``StoreLoader`` against the decompression limit of the same shards, in one process, on one core.

Cases, interleaved over ``--rounds`` rounds on a synthetic store on disk (points + prefix, as ``distill``):
  decode-only   read each shard file (page cache) and Blosc-decode every valid inner chunk into place
                (the shards' index parsed beforehand): no zarr, checksums, shuffling or batching
  loader wN     one epoch of the real ``StoreLoader`` (train/data.py) with N worker processes

The process (and so its loader workers) is pinned to ``--cores`` cores (default 1): the ratio
loader / decode-only is the loader's efficiency per core, the issue-24 goal being >= 0.5.

    python bench/loader.py --out bench/results/loader.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _store import store_factory
from numcodecs import blosc

from pkd.common.store import array_of, iter_shards, open_split
from pkd.train.data import LoaderConfig, StoreLoader

from _report import write_report

ARRAYS = ("points", "prefix")


def shard_chunks(store: Path) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """(shard file, (offset, size) of each valid sample's compressed chunk, output buffer) per array and shard."""
    group = open_split(store, "train")
    valid = np.asarray(array_of(group, "valid")[:]).astype(bool)
    work = []
    for name in ARRAYS:
        array = array_of(group, name)
        size = int(array.shards[0])
        for shard, start, stop in iter_shards(group):
            path = store / array.path / array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
            data = path.read_bytes()
            index = np.frombuffer(data, "<u8", count=2 * size, offset=len(data) - 16 * size - 4).reshape(size, 2)
            rows = np.flatnonzero(valid[start:stop])
            chunks = index[rows] - np.array([0, 4], dtype="<u8")  # less each chunk's CRC32C
            work.append((path, chunks.astype(np.int64), np.empty((len(rows), *array.shape[1:]), array.dtype)))
    return work


def decode_only(work: list[tuple[Path, np.ndarray, np.ndarray]]) -> float:
    """Samples per second of reading each shard file and Blosc-decoding its valid chunks into place."""
    tic = time.perf_counter()
    for path, chunks, out in work:
        data = np.frombuffer(path.read_bytes(), np.uint8)
        for i, (offset, size) in enumerate(chunks.tolist()):
            blosc.decompress(data[offset : offset + size], out[i : i + 1].reshape(-1).view(np.uint8))
    samples = sum(len(chunks) for _, chunks, _ in work) / len(ARRAYS)
    return samples / (time.perf_counter() - tic)


def loader_epoch(store: Path, batch: int, points: int, workers: int) -> float:
    """Samples per second of one epoch of the real loader (construction excluded)."""
    loader = StoreLoader(LoaderConfig(str(store), "train", ARRAYS, batch, points), num_workers=workers)
    tic, samples = time.perf_counter(), 0
    for item in loader.epoch(0):
        samples += len(item["points"])
    return samples / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts, comma-separated")
    parser.add_argument("--cores", type=int, default=1, help="cores the process and its workers are pinned to")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than pinned cores: meant
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        store = store_factory().make_store(
            Path(tmp) / "bench.zarr",
            n=args.samples,
            num_points=args.points,
            shard_size=args.shard_size,
            patch_tokens=False,
            stats=False,
        )
        work = shard_chunks(store)
        rates: dict[str, list[float]] = {"decode-only": [], **{f"loader w{w}": [] for w in workers}}
        for _ in range(args.rounds):
            rates["decode-only"].append(decode_only(work))
            for w in workers:
                rates[f"loader w{w}"].append(loader_epoch(store, args.batch, args.points, w))
    limit = statistics.median(rates["decode-only"])
    rows = [
        {"case": case, "samples/s": statistics.median(r), "best": max(r), "ratio": statistics.median(r) / limit}
        for case, r in rates.items()
    ]
    setup = {
        "points": args.points,
        "samples": args.samples,
        "shard_size": args.shard_size,
        "batch": args.batch,
        "cores": len(cores),
        "rounds": args.rounds,
    }
    write_report(f"loader vs decode-only ({len(cores)} core(s), {args.points} points)", rows, args.out, setup)


if __name__ == "__main__":
    main()
