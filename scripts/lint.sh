#!/usr/bin/env bash
# Lint and format-check (ruff) and type-check (mypy, strict on pkd.common) the tree; any finding of either is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
.venv/bin/ruff check . || status=1
.venv/bin/ruff format --check . || status=1
# pyproject maps pkd.common -> common/ and so on (package-dir), and the editable install is an import hook
# mypy cannot follow, so mypy checks a tree of symlinks laid out as the package.
rm -rf .typecheck
mkdir -p .typecheck/pkd
for folder in common preprocess train data_manifests; do
    ln -s "$PWD/$folder" ".typecheck/pkd/$folder"
done
MYPYPATH=.typecheck .venv/bin/mypy -p pkd || status=1
exit "$status"
