#!/usr/bin/env bash
# Build the image and run the quickstart in it, with no registry and no network inside the build or the run:
#   make docker-check      (as root, on a Debian machine: installs docker.io and debootstrap if missing)
#
# 1. a Debian bookworm base with python3 from Debian's packages (debootstrap), imported as alexdist-base:bookworm;
# 2. docker/wheelhouse: every wheel the image needs, made here (pip download; DeepSpeed's wheel built with pip wheel);
# 3. docker build --network none, installing from the wheelhouse only;
# 4. the quickstart on 2 CPU processes, --network none, as the image's non-root user and as --user 4321:4321:
#    it must finish and leave its files owned by that user.
# A dockerd this script starts (--bridge=none --iptables=false: no private network is set up) is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
IMAGE=alexdist:check
BASE=alexdist-base:bookworm
work=$(mktemp -d)
dockerd_pid=""
cleanup() {
  if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

if ! { command -v docker >/dev/null && command -v debootstrap >/dev/null; }; then
  apt-get install -y -q docker.io debootstrap \
    || { apt-get update -q && apt-get install -y -q docker.io debootstrap; } \
    || { echo "docker-check: could not install docker.io and debootstrap (apt)"; exit 3; }
fi
if ! docker info >/dev/null 2>&1; then
  dockerd --bridge=none --iptables=false >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  # Exit 3 (also above): this machine cannot run containers at all (no docker, no privileges for dockerd), as
  # opposed to an image or a run that fails (exit 1).
  docker info >/dev/null 2>&1 || { echo "docker-check: dockerd did not start:"; tail -20 "$work/dockerd.log"; exit 3; }
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  # The mirror apt uses here (deb822 .sources or a one-line sources.list), else Debian's default.
  mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | sed -nE 's#^(URIs: |deb )(https?://[^ ]+/debian)/?( .*)?$#\2#p' | head -1 || true)
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "${mirror:-http://deb.debian.org/debian}"
  tar -C "$work/rootfs" -c . | docker import - "$BASE"
fi

# Wheels for the image's Python (Debian bookworm: 3.11, like this machine's), from PyPI through pip here.
TORCH=$(sed -nE 's/.*torch==([0-9.]+).*/\1/p' Makefile | head -1)
VISION=$(sed -nE 's/.*torchvision==([0-9.]+).*/\1/p' Makefile | head -1)
"$PY" - <<'PY' >"$work/requirements.txt"
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(r for r in p["dependencies"] if not re.match(r"torch\b", r)))
PY
"$PY" -m pip download -q -d docker/wheelhouse "torch==$TORCH" "torchvision==$VISION" -r "$work/requirements.txt" \
  "setuptools>=68" wheel
DS=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w docker/wheelhouse "deepspeed==$DS"
unzip -p docker/wheelhouse/deepspeed-*.whl '*/METADATA' | sed -nE 's/^Requires-Dist: ([^;]+)$/\1/p' \
  | grep -v '^torch' >"$work/ds-requirements.txt"
"$PY" -m pip download -q -d docker/wheelhouse -r "$work/ds-requirements.txt" "torch==$TORCH"

docker build --network none -f docker/Dockerfile -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE" \
  --build-arg "TORCH_VERSION=$TORCH" --build-arg "TORCHVISION_VERSION=$VISION" \
  --build-arg "PIP_OPTIONS=--no-index --find-links /wheelhouse" .

for who in image 4321:4321; do
  runs="$work/runs-${who%%:*}"
  mkdir -p "$runs" && chmod 777 "$runs"
  user=(); [ "$who" = image ] || user=(--user "$who")
  docker run --rm --network none "${user[@]}" -v "$runs:/workspace/runs" -e WANDB_MODE=offline "$IMAGE" \
    --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m alexdist.train quickstart output_dir=runs/quickstart
  owner=$(stat -c %u:%g "$runs/quickstart/summary.json")
  want=$([ "$who" = image ] && echo 1000:1000 || echo "$who")
  acc=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['final_test_acc'])" "$runs/quickstart/summary.json")
  echo "docker-check: user $who: files owned by $owner (want $want), final test acc $acc"
  [ "$owner" = "$want" ] && "$PY" -c "import sys; sys.exit(float(sys.argv[1]) < 0.9)" "$acc"
done
docker image ls "$IMAGE"
echo "docker-check: ok"
