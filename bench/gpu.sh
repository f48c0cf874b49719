#!/usr/bin/env bash
# The prepared GPU check: one table (teacher fp32/bf16/fp16 agreement and speed, whole prep against the
# teacher-only limit, distill and fine-tune steps in bf16 against the Point-MAE port, eager and then both
# torch.compile'd as `pkd-train distill --compile on` trains) and its JSON, with the table beside it as
# gpu.md (the section bench/results_gpu.md takes), in under 8 minutes on one H100/H200. Every step is timed;
# any failure stops it with a non-zero exit.
#
#   bash bench/gpu_wheels.sh                             # here, once: what the GPU image lacks -> .whl/
#   bash bench/gpu.sh --out "$OUT/gpu.json"              # there, with .whl carried (device `run`, carry .whl)
#   bash bench/gpu.sh --device cpu --quick --out X.json  # anywhere: the CPU-safe parts at tiny sizes
#
# Arguments go to bench/gpu.py (--device, --quick, --threads, --out). PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LIMIT_S="${PKD_GPU_BENCH_LIMIT_S:-470}"   # the whole check must end in 8 minutes: stop it, loudly, before that
SITE=/tmp/pkd-gpu-site
start_all=$(date +%s%N)

elapsed() {  # seconds since a `date +%s%N` stamp, with milliseconds
    local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
    printf '%d.%03d s' $((ms / 1000)) $((ms % 1000))
}

step() {  # step NAME COMMAND...: run it, print how long it took; set -e stops the script if it fails
    local name=$1 start
    shift
    start=$(date +%s%N)
    echo "== $name" >&2
    "$@"
    echo "== $name: $(elapsed "$start")" >&2
}

OPEN_CLIP="from pkd.preprocess.torchvision_compat import import_open_clip; import_open_clip()"

link_pkd() {  # pkd importable without installing: its folders under a pkd/ package path (pyproject's package-dir)
    if "$PYTHON" -c "import pkd.common.errors" 2>/dev/null; then
        return
    fi
    mkdir -p "$SITE/pkd"
    for folder in common preprocess train data_manifests; do
        ln -sfn "$PWD/$folder" "$SITE/pkd/$folder"
    done
}

install_dependencies() {  # the carried wheels, where pkd's dependencies are missing (the GPU image)
    if "$PYTHON" -c "import zarr, numcodecs, google_crc32c, crc32c, fpsample, plyfile; $OPEN_CLIP" 2>/dev/null; then
        return
    fi
    if [ ! -d .whl ]; then
        echo "error: pkd's dependencies are missing and there is no .whl/: run bash bench/gpu_wheels.sh where pip" \
             "works and carry .whl" >&2
        exit 1
    fi
    local pip=("$PYTHON" -m pip install --quiet --no-index --no-deps --no-cache-dir --target "$SITE")
    "${pip[@]}" --upgrade .whl/*.whl
    if ! "${pip[@]}" --no-build-isolation .whl/sdist/fpsample-*.tar.gz; then
        echo "warning: building fpsample's sdist failed; using the fallback wheel (recorded in the JSON)" >&2
        "${pip[@]}" .whl/fallback/fpsample-*.whl
    fi
}

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
step "link pkd" link_pkd
step "install dependencies" install_dependencies
step "import pkd" "$PYTHON" -c "import pkd.common.store, pkd.train.model, pkd.preprocess.prep; $OPEN_CLIP"
[ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())')" = True ] && nvidia-smi -L >&2 || true
step "bench/gpu.py $*" timeout "$LIMIT_S" "$PYTHON" bench/gpu.py "$@"
echo "== total: $(elapsed "$start_all")" >&2
