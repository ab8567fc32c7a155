#!/usr/bin/env bash
# Build the images config/ deploys (and the demo app) with `docker build`; `make images` runs this.
#
# Usage: scripts/build_images.sh [--push] [NAME...]
#   NAME: proxy daemon webhook sleeptalker (default: all four)
# Environment:
#   REGISTRY      image prefix            (default ghcr.io/freeze-proxy)
#   TAG           image tag               (default latest)
#   PYTHON_IMAGE  base image, e.g. pinned by digest (default: each Dockerfile's ARG)
#   DOCKER        the docker CLI          (default docker)
#   DOCKER_BUILDKIT  1 (default) or 0: the classic builder, for an engine that cannot fetch the
#                 Dockerfiles' `# syntax=docker/dockerfile:1` frontend from Docker Hub (offline)
#   WHEELHOUSE    a directory of wheels to install from instead of the package index: offline
#                 builds, or an index behind a TLS-intercepting proxy the build cannot verify. The
#                 host's pip (with its CA configuration) fills it (`pip download`) unless it holds
#                 a file named .complete; each build gets a copy in its context's wheelhouse/ and
#                 runs with --network none. The host's Python must be the images' (3.11).
#   PIP           the host's pip for WHEELHOUSE (default: python3 -m pip)
#
# Image names are REGISTRY/freeze-proxy, REGISTRY/freeze-daemon, REGISTRY/freeze-webhook and
# REGISTRY/sleeptalker: what config/ references, so `kustomize edit set image` can retarget them.
set -euo pipefail

REGISTRY="${REGISTRY:-ghcr.io/freeze-proxy}"
TAG="${TAG:-latest}"
DOCKER="${DOCKER:-docker}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

push=0
names=()
for arg in "$@"; do
    case "$arg" in
        --push) push=1 ;;
        proxy|daemon|webhook|sleeptalker) names+=("$arg") ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build_images: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done
[[ ${#names[@]} -gt 0 ]] || names=(proxy daemon webhook sleeptalker)

if ! command -v "$DOCKER" >/dev/null 2>&1; then
    echo "build_images: '$DOCKER' not found (set DOCKER=podman to use podman)" >&2
    exit 1
fi

build_args=()
[[ -n "${PYTHON_IMAGE:-}" ]] && build_args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")

# What the images' pip installs: the build requirement and every extra an image uses (pyproject
# owns them) and the demo app's requirement (its Dockerfile owns it).
requirements() {
    python3 - "$repo_root/pyproject.toml" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(project["build-system"]["requires"]))
for extra in ("daemon", "webhook"):
    print("\n".join(project["project"]["optional-dependencies"][extra]))
EOF
    grep -o 'pip install "[^"]*"' "$repo_root/examples/sleeptalker/Dockerfile" | cut -d'"' -f2
}

copied=()
cleanup() {
    for dir in ${copied[@]+"${copied[@]}"}; do
        find "$dir" -mindepth 1 ! -name .gitignore -delete
    done
}
if [[ -n "${WHEELHOUSE:-}" ]]; then
    mkdir -p "$WHEELHOUSE"
    if [[ ! -e "$WHEELHOUSE/.complete" ]]; then
        echo "build_images: filling the wheelhouse $WHEELHOUSE (pip download)" >&2
        mapfile -t reqs < <(requirements)
        ${PIP:-python3 -m pip} download --quiet --only-binary=:all: --dest "$WHEELHOUSE" "${reqs[@]}"
        touch "$WHEELHOUSE/.complete"
    fi
    trap cleanup EXIT
    build_args+=(--network none)
fi

for name in "${names[@]}"; do
    case "$name" in
        proxy)       image="freeze-proxy";   file="Dockerfile.proxy";   context="." ;;
        daemon)      image="freeze-daemon";  file="Dockerfile.daemon";  context="." ;;
        webhook)     image="freeze-webhook"; file="Dockerfile.webhook"; context="." ;;
        sleeptalker) image="sleeptalker";    file="examples/sleeptalker/Dockerfile"
                     context="examples/sleeptalker" ;;
    esac
    ref="$REGISTRY/$image:$TAG"
    echo "build_images: $ref ($file)" >&2
    if [[ -n "${WHEELHOUSE:-}" ]]; then
        copied+=("$repo_root/$context/wheelhouse")
        cp "$WHEELHOUSE"/*.whl "$repo_root/$context/wheelhouse/"
    fi
    (cd "$repo_root" && DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-1}" "$DOCKER" build \
        ${build_args[@]+"${build_args[@]}"} -f "$file" -t "$ref" "$context")
    cleanup
    if [[ $push -eq 1 ]]; then
        "$DOCKER" push "$ref"
    fi
done
