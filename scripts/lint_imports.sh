#!/usr/bin/env bash
# Check the layering contracts in .importlinter with lint-imports (import-linter, in the venv).
#
# import-linter takes only packages as root_packages (grimp refuses a single-file module,
# seddonym/import-linter#349), while the worker keeps each stage's entry as a root module
# (handler.py, pipeline.py, train_lora.py, …; CONTRACT §5). So lint a mirror of the tree in a
# temporary folder: each root module X.py linked as X/__init__.py, each package linked as itself.
# Module names do not change, so the contracts and the report read as the code does.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
lint_imports=${LINT_IMPORTS:-$root/.venv/bin/lint-imports}

mirror=$(mktemp -d "${TMPDIR:-/tmp}/lint-imports.XXXXXX")
trap 'rm -rf "$mirror"' EXIT
for module in *.py; do
    mkdir "$mirror/${module%.py}"
    ln -s "$root/$module" "$mirror/${module%.py}/__init__.py"
done
for init in */__init__.py; do
    ln -s "$root/${init%/__init__.py}" "$mirror/${init%/__init__.py}"
done

cd "$mirror"
"$lint_imports" --no-cache --no-logo "$root/.importlinter"
