#!/usr/bin/env bash
# Build a dataset on Google Cloud Dataflow (Apache Beam), from your workstation.
#
#   pip install 'mmjax[beam]' 'apache-beam[gcp]'
#   export PROJECT=my-project REGION=us-central1 BUCKET=gs://my-bucket   # MAX_WORKERS optional
#   bash launch/dataflow_data.sh webdataset gs://my-bucket/cc12m/{00000..01242}.tar \
#       --out gs://my-bucket/shards/cc12m --max-side 336
#   bash launch/dataflow_data.sh parquet gs://my-bucket/laion/*.parquet --out gs://... --fetch-urls
#   DRY_RUN=1 bash launch/dataflow_data.sh ...        # print the commands, run none
#
# The arguments are `python -m data_pipelines.convert`'s (any KIND); this adds the Dataflow
# options. The workers install this project from a wheel built here (--extra_package), so
# they run the same converters. Inputs, image roots and --out may be gs:// URLs (read and
# written through Beam's file systems); a LLaVA JSON itself must be a local file (its images
# may be on gs://). The job writes what the in-process build writes (README "At scale").
# Rerun the same command after a failure: the output is rebuilt, the same files.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET (gs://...)}"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DIST=${DIST:-dist}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL="$DIST/mmjax-$VERSION-py3-none-any.whl"
JOB=${JOB_NAME:-mmjax-data-$(date +%Y%m%d-%H%M%S)}
# DRY_RUN=1: print each command (shell-quoted, one per line) instead of running it
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
[ $# -ge 1 ] || { echo "usage: dataflow_data.sh KIND INPUTS... --out gs://... [convert options]" >&2; exit 2; }
run "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DIST" .
run "$PYTHON" -m data_pipelines.convert "$@" --no-progress \
  --runner DataflowRunner --project "$PROJECT" --region "$REGION" --job_name "$JOB" \
  --temp_location "$BUCKET/tmp" --staging_location "$BUCKET/staging" \
  --extra_package "$WHEEL" ${MAX_WORKERS:+--max_num_workers "$MAX_WORKERS"}
