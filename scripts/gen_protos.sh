#!/usr/bin/env bash
# Regenerate the daemon's gRPC stubs from daemon/_proto/*.proto.
#
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repo root, i.e. in place)
#
# Run from anywhere; protoc runs from the repo root with -I . so generated imports are
# package-qualified (`from daemon._proto import tasks_pb2`). The output only depends on the
# .proto files and the grpcio-tools version, which is pinned: generated code demands a
# protobuf/grpcio runtime at least as new as the generator, so regenerate with the pinned one.
set -euo pipefail

PINNED_GRPCIO_TOOLS="1.85.1"
PYTHON="${PYTHON:-python3}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$repo_root}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"

have="$("$PYTHON" -c 'from importlib.metadata import version; print(version("grpcio-tools"))')"
if [[ "$have" != "$PINNED_GRPCIO_TOOLS" ]]; then
    echo "gen_protos: grpcio-tools $have installed, $PINNED_GRPCIO_TOOLS pinned;" \
        "output will differ from the committed stubs" >&2
fi

cd "$repo_root"
mkdir -p "$out_dir/daemon/_proto"
# Sorted, explicit file list: the glob order must not depend on the locale.
mapfile -t protos < <(LC_ALL=C ls daemon/_proto/*.proto | LC_ALL=C sort)
"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out="$out_dir" --pyi_out="$out_dir" --grpc_python_out="$out_dir" \
    "${protos[@]}"
echo "gen_protos: generated ${#protos[@]} files' stubs into $out_dir/daemon/_proto" >&2
