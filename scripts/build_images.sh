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
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
    (cd "$repo_root" && DOCKER_BUILDKIT=1 "$DOCKER" build ${build_args[@]+"${build_args[@]}"} \
        -f "$file" -t "$ref" "$context")
    if [[ $push -eq 1 ]]; then
        "$DOCKER" push "$ref"
    fi
done
