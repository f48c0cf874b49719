#!/usr/bin/env bash
# Lint (ruff) and type-check (mypy, strict on pkd.common) the tree; any finding is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
# pyproject maps pkd.common -> common/ and so on (package-dir), and the editable install is an import hook
# mypy cannot follow, so mypy checks a tree of symlinks laid out as the package.
rm -rf .typecheck
mkdir -p .typecheck/pkd
for folder in common preprocess train data_manifests; do
    ln -s "$PWD/$folder" ".typecheck/pkd/$folder"
done
MYPYPATH=.typecheck .venv/bin/mypy -p pkd
