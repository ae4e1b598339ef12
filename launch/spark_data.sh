#!/usr/bin/env bash
# Build a dataset on a Spark cluster with Apache Beam's SparkRunner (portable: Beam starts its
# Spark job server, which submits the job to the cluster's master).
#
#   export SPARK_MASTER=spark://host:7077
#   export SDK_IMAGE=registry/mmjax-beam:0.1.0   # the workers' container, built once:
#       #   FROM apache/beam_python3.11_sdk:2.78.0
#       #   COPY . /mmjax
#       #   RUN pip install '/mmjax[beam]'
#   bash launch/spark_data.sh llava_instruct /shared/llava_v1_5_mix665k.json \
#       --image-root /shared/images --out /shared/shards/mix665k
#   DRY_RUN=1 bash launch/spark_data.sh ...           # print the command, run none
#
# The arguments are `python -m data_pipelines.convert`'s. The workers run the Python steps in
# SDK_IMAGE, so they run the same converters; inputs and --out must be paths every worker
# sees (mounted into the containers) or URLs of a store Beam reads (gs://, s3://, hdfs://).
set -euo pipefail
: "${SPARK_MASTER:?set SPARK_MASTER (spark://host:7077)}"
: "${SDK_IMAGE:?set SDK_IMAGE (a Beam SDK container with mmjax installed)}"
PYTHON=${PYTHON:-python}
# DRY_RUN=1: print the command (shell-quoted) instead of running it
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
[ $# -ge 1 ] || { echo "usage: spark_data.sh KIND INPUTS... --out DIR [convert options]" >&2; exit 2; }
run "$PYTHON" -m data_pipelines.convert "$@" --no-progress \
  --runner SparkRunner --spark_master_url "$SPARK_MASTER" \
  --environment_type DOCKER --environment_config "$SDK_IMAGE"
