#!/usr/bin/env bash
# Install pkd into .venv and run the main job end to end on a synthetic ScanNet-format scene:
# write the scene (.sens + exported frames) and a second capture of it under a val-list name, prep both
# into a pair store (train and val splits) with the seeded random teacher, verify the store, distil a
# student for a few steps (its held-out loss every epoch in demo/runs/distill/metrics.jsonl and curves.png)
# and export its encoder in Point-MAE's format.
# Everything lands in ./demo (replaced on every run of this script).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
rm -rf demo
set -x
pkd-prep demo-scene --out demo/scannet --frames 250
pkd-prep scannet --root demo/scannet --out demo/pairs.zarr --teacher random --shard-size 4
pkd-prep verify demo/pairs.zarr
pkd-prep info demo/pairs.zarr
pkd-prep show demo/pairs.zarr --index 2 --out demo/sample.png
pkd-train distill demo/pairs.zarr --run-dir demo/runs/distill --max-steps 10 --batch-size 4 --monitor-recon
pkd-train export demo/runs/distill --out demo/encoder.pth
