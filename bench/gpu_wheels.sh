#!/usr/bin/env bash
# Download, here (with pip access), what bench/gpu.sh installs on a GPU machine that has no internet: the
# packages pkd's prep and training import that the device image lacks (its Python 3.12 has torch,
# torchvision, numpy, opencv, tqdm, pillow, timm, huggingface-hub, regex, pyyaml, scikit-build-core,
# pybind11, cmake, ...). Versions are pkd's pins (pyproject.toml) or what pkd's own .venv resolved.
# fpsample 1.0.2 has no binary wheel on PyPI: its sdist is built there (scikit-build-core + pybind11),
# and fpsample 0.3.3's wheel is the fallback gpu.sh takes (and records) if that build fails.
#
#   bash bench/gpu_wheels.sh            # -> .whl/ (git-ignored), then carry ".whl" to the device
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 crc32c==2.9.post0
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 plyfile==1.1.5
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
download() {
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
rm -rf .whl
mkdir -p .whl/fallback .whl/sdist
download --only-binary=:all: -d .whl "${WHEELS[@]}"
download --only-binary=:all: -d .whl/fallback fpsample==0.3.3
python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: -d .whl/sdist fpsample==1.0.2 \
    2> >(grep -v "^WARNING: Location" >&2)
count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ] || [ ! -f .whl/sdist/fpsample-1.0.2.tar.gz ]; then
    echo "error: expected ${#WHEELS[@]} wheels and the fpsample sdist in .whl/, found $count wheels" >&2
    exit 1
fi
echo "$count wheels + fpsample sdist and fallback, $(du -sh .whl | cut -f1) in .whl/"
