#!/bin/sh
# Run as the last command of every RUN in the Dockerfile's runtime stage (bind-mounted on /srv):
# makes the layer that RUN produces the same bytes on every build. POSIX sh (the base's /bin/sh is
# dash); needs SOURCE_DATE_EPOCH (a build ARG there).
#
# Why each step (a layer tar is the overlay upper dir: every file or directory the RUN created,
# changed or copied up, with its mode, owner, size, mtime and content):
#  - apt: /var/lib/apt/lists/* (downloaded indexes), /var/cache/apt/*.bin (caches that embed mtimes),
#    downloaded .deb files and lock files: build-time downloads, and `apt-get update` is needed before
#    any install anyway. The lists/partial and archives/partial dirs stay, as in the base.
#  - /var/log/* files (dpkg.log, apt/history.log, apt/term.log, apt/eipp.log.xz, alternatives.log):
#    wall-clock timestamps.
#  - /var/cache/ldconfig/aux-cache: keyed by the libraries' inode/ctime.
#  - /var/cache/debconf/*-old, /var/lib/dpkg/*-old: backups whose presence depends on timing.
#  - /root/.cache, /tmp/*, /var/tmp/*: caches and scratch (pip's, python's).
#  - /etc/shadow, /etc/shadow-: useradd writes "today" (days since 1970) as the last password change;
#    set to SOURCE_DATE_EPOCH's day, only in files this layer changed (else sed would copy them up).
#  - mtimes: everything newer than SOURCE_DATE_EPOCH (what this RUN wrote, incl. the directories
#    whose entries it changed) is set to SOURCE_DATE_EPOCH. Older mtimes (from .deb / wheel contents,
#    the base) are already fixed. Pruned: the kernel filesystems, the RUN's bind mounts (/srv, /media:
#    read-only build inputs) and the files BuildKit mounts over /etc/{hosts,hostname,resolv.conf}.
#    The base image must contain those three files (make-base.sh ships them): BuildKit would create
#    a missing one for the RUN, delete it afterwards, and so leave /etc with a wall-clock mtime after
#    this script has run.
set -eu
: "${SOURCE_DATE_EPOCH:?must be set}"

rm -rf /var/lib/apt/lists/lock /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
       /var/cache/apt/archives/lock /var/cache/ldconfig/aux-cache /var/cache/debconf/*-old \
       /var/lib/dpkg/*-old /root/.cache
find /var/lib/apt/lists -mindepth 1 -maxdepth 1 ! -name partial -exec rm -rf {} +
find /var/log -type f -delete
find /tmp /var/tmp -mindepth 1 -delete

day=$((SOURCE_DATE_EPOCH / 86400))
find /etc -maxdepth 1 \( -name shadow -o -name shadow- \) -type f -newermt "@$SOURCE_DATE_EPOCH" \
  -exec sed -i -E "s/^([^:]*:[^:]*:)[0-9]+:/\1$day:/" {} +

find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /srv -o -path /media \
                -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf \) -prune \
       -o -newermt "@$SOURCE_DATE_EPOCH" -print0 \
  | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"
