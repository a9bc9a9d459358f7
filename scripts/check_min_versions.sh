#!/usr/bin/env bash
# Install the declared dependency floors, exactly, into a fresh virtual environment and run the
# default test suite on them: the floors in setup.cfg are the tested ones only while this passes.
#
#     bash scripts/check_min_versions.sh              # pytest -x -q (the default, "not slow", suite)
#     bash scripts/check_min_versions.sh -k matcher   # other pytest arguments replace -x -q
#
# Every `name>=X` of install_requires and of the dev extra becomes the pin `name==X` (a
# constraints file, so pip cannot move them); the packages they pull in resolve as usual. The
# venv lies in a temporary folder, removed on exit (it holds gigabytes: torch from PyPI is a CUDA
# build; pip's cache keeps the wheels for a re-run). Needs PyPI; $PYTHON picks the interpreter
# (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# setup.cfg -> constraints.txt: one name==floor line per requirement.
"$python" - "$scratch/constraints.txt" <<'PY'
import configparser, re, sys

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["dev"].splitlines()
pins = {}
for line in lines:
    line = line.split("#")[0].strip()
    if not line:
        continue
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)\s*(,.*)?", line)
    if not match:
        sys.exit(f"setup.cfg: no '>=' floor in requirement {line!r}")
    pins[match[1].lower()] = match[2]
with open(sys.argv[1], "w") as out:
    out.writelines(f"{name}=={version}\n" for name, version in pins.items())
PY
echo "== floors (setup.cfg)"
cat "$scratch/constraints.txt"

"$python" -m venv "$scratch/venv"
source "$scratch/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -c "$scratch/constraints.txt" -e ".[dev]"

echo "== installed"
python - "$scratch/constraints.txt" <<'PY'
import platform, sys
from importlib.metadata import version
from pip._vendor.packaging.version import Version

print("python", platform.python_version())
off = []
for line in open(sys.argv[1]):
    name, floor = line.strip().split("==")
    got = version(name)
    print(f"{name:18} {got:14} floor {floor}")
    if Version(got) != Version(floor):
        off.append(name)
sys.exit(f"installed versions differ from their floors: {off}" if off else 0)
PY

(( $# )) || set -- -x -q
echo "== pytest $*"
start=$SECONDS
set +e
python -m pytest "$@"
status=$?
set -e
echo "== pytest exit $status after $(( SECONDS - start )) s"
exit "$status"
