#!/usr/bin/env bash
# Regenerates the Python code for proto/ into xo/v1/. With --check, fails if the committed
# code differs from what the .proto files generate (CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=.
if [ "${1:-}" = --check ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
"$py" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/xo/v1/offload.proto proto/xo/v1/local.proto
if [ "${1:-}" = --check ]; then
  for f in offload_pb2.py offload_pb2.pyi offload_pb2_grpc.py local_pb2.py local_pb2.pyi local_pb2_grpc.py; do
    cmp -s "$out/xo/v1/$f" "xo/v1/$f" || { echo "xo/v1/$f is stale: run scripts/gen-proto.sh" >&2; exit 1; }
  done
  echo "generated protobuf code is up to date"
fi
