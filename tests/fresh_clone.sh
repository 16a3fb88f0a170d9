#!/usr/bin/env bash
# A machine that holds only a clone: `git clone` of this repository's HEAD into a temporary directory, with HOME,
# the XDG caches and jax's compilation cache there too, then every launcher's --help and the main job at its tiny
# budget, run from the clone. It reuses this checkout's installed packages (PYTHON, default .venv/bin/python, with
# the clone first on PYTHONPATH) instead of a `make setup` there, so it needs no network; it fails when the clone's
# code is not the code that runs, when its data or assets resolve outside it, or when a launcher fails.
#
#   bash tests/fresh_clone.sh      (.ci/run runs it after `make test`; ~7 min on a 2-core CPU, its compilation cache empty)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
clone=$tmp/hdjax
git clone --quiet "$repo" "$clone"
export HOME=$tmp/home XDG_CACHE_HOME=$tmp/cache XDG_CONFIG_HOME=$tmp/config HDJAX_COMPILE_CACHE=$tmp/cache/jax \
  MPLCONFIGDIR=$tmp/config/matplotlib PYTHONPATH=$clone
unset HDJAX_CHECKPOINTS
cd "$clone"

"$python" - "$clone" <<'EOF'
import sys
import hdjax
from experiments import common
from hdjax import assets
clone = sys.argv[1]
where = dict(code=hdjax.__file__, questions=common.SPEC_BENCH_QUESTIONS, articles=common.XSUM_ARTICLES,
             checkpoints=str(assets.checkpoints_dir()))
outside = {k: v for k, v in where.items() if not v.startswith(clone + "/")}
if outside:
  sys.exit(f"fresh clone: resolved outside the clone {clone}: {outside}")
EOF

for launcher in $(grep -l '^if __name__ == "__main__":' experiments/*.py); do
  module=$(basename "$launcher" .py)
  help=$("$python" -m "experiments.$module" --help 2>&1) || true  # absl's --help exits with status 1
  if [[ $help != *"Try --helpfull"* ]]; then
    echo "$help" | tail -20
    echo "fresh clone: experiments.$module --help did not list its flags" >&2
    exit 1
  fi
done
echo "fresh clone: every launcher's --help runs"
"$python" -m experiments.main --budget=tiny --out_dir="$tmp/results"
echo "fresh clone: the main job ran at its tiny budget in $clone (HEAD $(git rev-parse --short HEAD))"
