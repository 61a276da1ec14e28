#!/usr/bin/env bash
# Run the whole suite with the services it needs. Exit non-zero unless tests ran and passed:
# pytest's exit code 5 ("no tests collected") is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."

mkdir -p build

# PostgreSQL's server binaries for the migration tests (tests/services.py starts a throwaway cluster;
# the S3 server comes from the venv). CI runs as root on a fresh machine: install them there.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: installing PostgreSQL (apt-get install postgresql)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
            || { echo "scripts/test.sh: apt-get install postgresql failed" >&2; exit 1; }
    else
        echo "scripts/test.sh: PostgreSQL is not installed, so the migration tests will skip" \
             "(they fail when CI=true): sudo apt-get install postgresql" >&2
    fi
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export MPLCONFIGDIR="${MPLCONFIGDIR:-$PWD/build/mpl}"

# The layering (.importlinter) first: a broken contract fails the run, after the tests have run too.
lint_rc=0
bash scripts/lint_imports.sh || lint_rc=1

.venv/bin/python -m pytest --junitxml=build/junit.xml "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
if [ "$lint_rc" -ne 0 ]; then
    echo "scripts/test.sh: lint-imports found a broken layering contract (see above)" >&2
    rc=1
fi

# The Supabase Edge Function (TypeScript, Deno): Deno comes from the npm registry into build/deno.
# --no-config/--node-modules-dir=none: no package.json or deno.json above the function changes how
# it resolves imports. Only node: built-ins are imported, so nothing is fetched at test time.
if [ $# -eq 0 ]; then
    if [ ! -x build/deno/node_modules/.bin/deno ]; then
        command -v npm >/dev/null || { echo "scripts/test.sh: npm is needed to install Deno for the Edge Function tests" >&2; exit 1; }
        npm install --silent --no-audit --no-fund --prefix build/deno deno@2 >/dev/null || exit 1
    fi
    build/deno/node_modules/.bin/deno test --no-config --node-modules-dir=none supabase/functions/ || rc=1
    build/deno/node_modules/.bin/deno check --no-config --node-modules-dir=none supabase/functions/process-training-jobs/index.ts || rc=1
fi
exit "$rc"
