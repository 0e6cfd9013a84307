#!/usr/bin/env bash
# Build a minimal Debian bookworm (amd64) base image locally with debootstrap,
# reproducibly, and load it into the local Docker engine.
#
#   docker/make-base.sh [-t TAG] [-o OUT_TAR] [--no-load]
#
# Env: IMAGE_TAG (repro-merge-base:bookworm), OUT (rootfs tar path), DOCKER,
#      WORKDIR (/var/tmp/repro-merge-base), SOURCE_DATE_EPOCH, MIRROR,
#      BASE_INCLUDE (debootstrap --include list), NO_LOAD=1, KEEP_ROOTFS=1.
#
# SOURCE_DATE_EPOCH defaults to 1686355200 = 2023-06-10T00:00:00Z, the Debian 12
# "bookworm" release day. It is only a timestamp: no snapshot mirror is
# reachable here, so package VERSIONS are whatever deb.debian.org serves for
# bookworm at build time. The installed list (dpkg-query -W) is recorded in
# the image at /usr/share/repro-merge-base-packages.txt and printed. Two builds
# are byte-identical as long as the mirror has not moved in between.
#
# Why each removal/normalisation. Two raw same-day debootstraps differed in
# aux-cache, var/log/* and every mtime; the rest differs across days, hosts or
# mirror updates, or is removed defensively:
#  - /var/lib/apt/lists/*, /var/cache/apt/*: downloaded indexes/caches (and
#    apt's .bin caches embed mtimes); the image user runs apt-get update anyway.
#  - /var/log/* (files): bootstrap.log, dpkg.log, alternatives.log, apt logs
#    carry wall-clock timestamps.
#  - /var/cache/ldconfig/aux-cache: keyed by inode/ctime of the libraries.
#  - /var/cache/debconf/*-old, /var/lib/dpkg/*-old: backup copies whose
#    content depends on install order/timing.
#  - *.pyc / __pycache__: written by py3compile in python3's postinst; marshal
#    output is not guaranteed stable (identical in our test, removed anyway).
#    Python regenerates them when needed.
#  - /etc/machine-id -> empty, /var/lib/dbus/machine-id removed: random ids.
#  - /etc/hostname, /etc/resolv.conf: debootstrap copies them from the HOST
#    (with the host's mode, 0755 here); replaced by empty 0644 files (Docker
#    bind-mounts its own at run time).
#  - /etc/hosts: minbase has none (netbase is not included). Docker bind-mounts
#    one at run time, but BuildKit (Docker 20.10) CREATES the missing mount
#    point during every RUN and deletes it afterwards, which leaves /etc with a
#    wall-clock mtime in every RUN layer of images built FROM this base. So the
#    base ships netbase's default localhost-only file.
#  - /etc/shadow, /etc/shadow- : field 3 (last password change) is "today" in
#    days; set to SOURCE_DATE_EPOCH's day.
#  - /dev/*, /proc/*, /sys/*, /run/*, /tmp/*, /var/tmp/*: device nodes and
#    scratch made during bootstrap; Docker provides /dev, /proc, /sys at run time.
#  - mtimes: every file created during the build has "now" as mtime; all mtimes
#    are clamped to SOURCE_DATE_EPOCH (in the tree and again by tar).
#  - tar: --sort=name (readdir order varies), --format=posix with
#    exthdr.name=%d/PaxHeaders/%f (the default name contains the PID) and
#    delete=atime,ctime (vary per run); --numeric-owner so host user names
#    never leak in. Ownership is NOT forced to 0:0: the rootfs has legitimately
#    non-root groups (shadow, mail, staff, utmp...) that must be kept.
#  - image: `docker import` stamps created=now, and Docker 20.10's BuildKit
#    (v0.8) ignores SOURCE_DATE_EPOCH, so instead we write a docker-save style
#    archive ourselves (config JSON with created=SOURCE_DATE_EPOCH, the rootfs
#    tar as the single layer) and `docker load` it: the image ID is the sha256
#    of that config, hence identical for identical inputs.
set -euo pipefail

IMAGE_TAG=${IMAGE_TAG:-repro-merge-base:bookworm}
WORKDIR=${WORKDIR:-/var/tmp/repro-merge-base}
OUT=${OUT:-$WORKDIR/rootfs.tar}
NO_LOAD=${NO_LOAD:-0}
DOCKER=${DOCKER:-docker}   # the nox sessions pass /usr/bin/docker (the 20.10 client)
while [ $# -gt 0 ]; do
  case $1 in
    -t|--tag) IMAGE_TAG=$2; shift 2 ;;
    -o|--out) OUT=$2; shift 2 ;;
    --no-load) NO_LOAD=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_INCLUDE=${BASE_INCLUDE-python3,python3-venv,ca-certificates}
SUITE=bookworm ARCH=amd64
export LC_ALL=C TZ=UTC
umask 022

[ "$(id -u)" = 0 ] || { echo "must run as root (debootstrap)" >&2; exit 1; }
ROOT=$WORKDIR/rootfs
rm -rf "$ROOT"; mkdir -p "$ROOT" "$(dirname "$OUT")"

opts=(--variant=minbase --arch="$ARCH")
[ -n "$BASE_INCLUDE" ] && opts+=(--include="$BASE_INCLUDE")
echo ">> debootstrap ${opts[*]} $SUITE $ROOT $MIRROR"
debootstrap "${opts[@]}" "$SUITE" "$ROOT" "$MIRROR" >"$WORKDIR/debootstrap.log" 2>&1 \
  || { tail -30 "$WORKDIR/debootstrap.log" >&2; exit 1; }

# apt sources for the image's users: release + point updates + security.
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF

# Record the package set (versions come from the live mirror; see header).
chroot "$ROOT" dpkg-query -W >"$ROOT/usr/share/repro-merge-base-packages.txt"
cp "$ROOT/usr/share/repro-merge-base-packages.txt" "$WORKDIR/packages.txt"
echo ">> python3 in base: $(chroot "$ROOT" python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo none)"

# --- remove / normalise what varies between runs (see header) ---
(
  cd "$ROOT"
  rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb \
         var/cache/ldconfig/aux-cache var/lib/dbus/machine-id \
         var/cache/debconf/*-old var/lib/dpkg/*-old
  mkdir -p var/lib/apt/lists/partial var/cache/apt/archives/partial
  find var/log -type f -delete
  find . -xdev \( -name '*.pyc' -o -name '*.pyo' \) -type f -delete
  find . -xdev -type d -name __pycache__ -empty -delete
  [ -e etc/machine-id ] && : >etc/machine-id
  rm -f etc/hostname etc/resolv.conf
  install -m 0644 /dev/null etc/hostname
  install -m 0644 /dev/null etc/resolv.conf
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' >etc/hosts
  chmod 0644 etc/hosts
  day=$((SOURCE_DATE_EPOCH / 86400))
  for f in etc/shadow etc/shadow-; do
    [ -f "$f" ] && sed -i -E "s/^([^:]*:[^:]*:)[0-9]+:/\1$day:/" "$f"
  done
  rm -rf dev/* proc/* sys/* run/* tmp/* var/tmp/*
  # clamp mtimes inside the tree too (so an unpacked rootfs is also stable)
  find . -xdev -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
)

echo ">> tar $OUT"
tar -C "$ROOT" --sort=name --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime --numeric-owner \
    -cf "$OUT" .
[ "${KEEP_ROOTFS:-0}" = 1 ] || rm -rf "$ROOT"

# --- deterministic image: docker-save archive with fixed created time ---
layer=$(sha256sum "$OUT" | cut -d' ' -f1)
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
cfg='{"architecture":"amd64","os":"linux","created":"'$created'",'
cfg+='"config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["bash"]},'
cfg+='"history":[{"created":"'$created'","created_by":"docker/make-base.sh: debootstrap --variant=minbase '$SUITE' (SOURCE_DATE_EPOCH='$SOURCE_DATE_EPOCH')"}],'
cfg+='"rootfs":{"type":"layers","diff_ids":["sha256:'$layer'"]}}'
cfgsha=$(printf %s "$cfg" | sha256sum | cut -d' ' -f1)
echo ">> rootfs tar sha256: $layer"
echo ">> image id:          sha256:$cfgsha"
echo ">> packages ($(wc -l <"$WORKDIR/packages.txt")): $WORKDIR/packages.txt"
if [ "$NO_LOAD" != 1 ]; then
  ld=$WORKDIR/load; rm -rf "$ld"; mkdir -p "$ld/$layer"
  ln "$OUT" "$ld/$layer/layer.tar" 2>/dev/null || cp "$OUT" "$ld/$layer/layer.tar"
  printf %s "$cfg" >"$ld/$cfgsha.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
    "$cfgsha" "$IMAGE_TAG" "$layer" >"$ld/manifest.json"
  tar -C "$ld" -cf - . | "$DOCKER" load
  rm -rf "$ld"
  echo ">> loaded $IMAGE_TAG ($("$DOCKER" image inspect -f '{{.Id}} created={{.Created}}' "$IMAGE_TAG"))"
fi
