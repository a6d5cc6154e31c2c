#!/usr/bin/env bash
# Regenerate server/api/ from proto/ (tests check the committed files are up to date).
# The include path maps proto/ to server/api so the generated imports are `server.api.mend.v1`
# and never collide with the `mend` library package.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iserver/api=proto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" proto/mend/v1/editing.proto
