#!/usr/bin/env bash
# Build phalanx's container image (and, with --debian-base, its base and a Prometheus
# image) from the repository root:
#
#   deploy/docker/build.sh                      # phalanx:latest FROM python:3.11-slim-bookworm
#   deploy/docker/build.sh --debian-base        # FROM a Debian base made here (no registry)
#   deploy/docker/build.sh --extras torch --tag phalanx:torch    # with the torch extra
#
# 1. wheelhouse: `pip wheel` of this checkout and its dependencies, on the host, with
#    the host's Python (it must be the image's CPython minor version, 3.11), into
#    deploy/docker/.build/ctx/wheels; the image installs from it with --no-index;
# 2. --debian-base: `mmdebstrap` makes a minimal Debian bookworm (python3, python3-venv,
#    ca-certificates, libisal2), `docker import`s it as phalanx/debian-base:bookworm and
#    builds phalanx/prometheus:bookworm from Debian's prometheus package (downloaded in
#    the same mmdebstrap run, installed with dpkg in the build). Both are kept and
#    reused while their recipe (the label phalanx.recipe) is unchanged; --rebuild-base
#    forces them;
# 3. `docker build` of deploy/docker/Dockerfile (multi-stage, non-root, HEALTHCHECK).
#
# Needs: docker (a running engine; DOCKER_HOST is honoured), python3.11 with pip, and
# for --debian-base mmdebstrap (root). Prints the image sizes at the end.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
base="python:3.11-slim-bookworm"
debian_base=0
rebuild_base=0
extras=""
tag="phalanx:latest"
python=${PYTHON:-}
while [ $# -gt 0 ]; do
    case $1 in
        --debian-base) debian_base=1 ;;
        --rebuild-base) rebuild_base=1; debian_base=1 ;;
        --base) base=$2; shift ;;
        --extras) extras=$2; shift ;;
        --tag) tag=$2; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
docker=${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker )}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3.11; fi
fi
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "build.sh: $python is not CPython 3.11 (the image's); set PYTHON=" >&2; exit 2; }

build=$here/.build
ctx=$build/ctx
t0=$(date +%s)
say() { printf '== build.sh: %s (%ss)\n' "$*" "$(($(date +%s) - t0))"; }

# -- 1. the wheelhouse -----------------------------------------------------------------
rm -rf "$ctx"
mkdir -p "$ctx/wheels"
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
say "wheelhouse: pip wheel $spec"
"$python" -m pip wheel --quiet --wheel-dir "$ctx/wheels" "$spec"
cp "$here/healthcheck.py" "$ctx/healthcheck.py"

# -- 2. the Debian base and Prometheus (no registry needed) ------------------------------
if [ "$debian_base" = 1 ]; then
    packages="python3,python3-venv,ca-certificates,libisal2"
    recipe=$(printf '%s\n' "bookworm $packages prometheus" | cat - "$here/prometheus.Dockerfile" \
             | sha256sum | cut -c1-16)
    have() { [ "$("$docker" image inspect -f '{{index .Config.Labels "phalanx.recipe"}}' "$1" 2>/dev/null)" = "$recipe" ]; }
    if [ "$rebuild_base" = 1 ] || ! have phalanx/debian-base:bookworm || ! have phalanx/prometheus:bookworm; then
        rm -rf "$build/base"
        mkdir -p "$build/base/prometheus/debs"
        say "mmdebstrap bookworm ($packages) + Debian's prometheus package"
        # the customize hooks run on this host with the new root's apt: they fetch only
        # what prometheus needs beyond the base, for the dpkg run in its image
        mmdebstrap --quiet --variant=minbase --include="$packages" \
            --customize-hook='chroot "$1" apt-get clean' \
            --customize-hook='chroot "$1" apt-get install --yes --download-only --no-install-recommends prometheus' \
            --customize-hook="copy-out /var/cache/apt/archives/ $build/base/prometheus/debs-tmp" \
            bookworm "$build/base/rootfs.tar"
        mv "$build/base/prometheus/debs-tmp/archives/"*.deb "$build/base/prometheus/debs/"
        say "docker import phalanx/debian-base:bookworm"
        "$docker" import --change "LABEL phalanx.recipe=$recipe" --change 'CMD ["/bin/bash"]' \
            "$build/base/rootfs.tar" phalanx/debian-base:bookworm
        say "docker build phalanx/prometheus:bookworm"
        cp "$here/prometheus.Dockerfile" "$build/base/prometheus/Dockerfile"
        "$docker" build --network none --label "phalanx.recipe=$recipe" \
            --build-arg BASE=phalanx/debian-base:bookworm \
            -t phalanx/prometheus:bookworm "$build/base/prometheus"
        rm -rf "$build/base"
    else
        say "phalanx/debian-base:bookworm and phalanx/prometheus:bookworm are current (recipe $recipe)"
    fi
    base=phalanx/debian-base:bookworm
fi

# -- 3. the image ----------------------------------------------------------------------
say "docker build $tag FROM $base${extras:+ (extras: $extras)}"
net=()
[ "$debian_base" = 1 ] && net=(--network none)  # nothing to fetch: prove it
old=$("$docker" image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
"$docker" build "${net[@]}" -f "$here/Dockerfile" --build-arg BASE="$base" \
    --build-arg EXTRAS="${extras:+[$extras]}" -t "$tag" "$ctx"
rm -rf "$ctx"
# the image this build replaced, if nothing else uses it (rebuilds must not pile up)
if [ -n "$old" ] && [ "$old" != "$("$docker" image inspect -f '{{.Id}}' "$tag")" ]; then
    "$docker" image rm "$old" >/dev/null 2>&1 || true
fi
for image in "$tag" $([ "$debian_base" = 1 ] && echo phalanx/debian-base:bookworm phalanx/prometheus:bookworm); do
    size=$("$docker" image inspect -f '{{.Size}}' "$image")
    printf '== image %s: %d MB\n' "$image" $((size / 1000000))
done
say "done"
