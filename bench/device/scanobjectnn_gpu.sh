#!/usr/bin/env bash
# One device session: the ScanObjectNN fine-tuning step benchmark (2048 points, 128 groups, batch 32) and a
# short `finetune scanobjectnn` on CUDA from official-format h5 files written on the spot.
set -euo pipefail
PY=${PY:-python}
$PY bench/train_step.py --points 2048 --groups 128 --cases finetune,finetune-pointmae --batch 32 --steps 10 \
    --rounds 3 --device cuda --out "$OUT/scanobjectnn_step_gpu.json"
$PY - "$OUT/h5" <<'PYEOF'
import sys, pathlib, h5py, numpy as np
root = pathlib.Path(sys.argv[1]) / "main_split"
root.mkdir(parents=True)
rng = np.random.default_rng(0)
for stem, n in (("training_objectdataset_augmentedrot_scale75", 64), ("test_objectdataset_augmentedrot_scale75", 32)):
    with h5py.File(root / f"{stem}.h5", "w") as h5:
        h5["data"] = rng.normal(size=(n, 2048, 3)).astype(np.float32)
        h5["label"] = (np.arange(n) % 15).astype(np.uint8)
PYEOF
pkd-train finetune scanobjectnn --data "$OUT/h5" --variant pb_t50_rs --init scratch --epochs 2 --device cuda \
    --run-dir "$OUT/run" 2>&1 | tail -3
rm -rf "$OUT/h5" "$OUT/run"/*.pt
