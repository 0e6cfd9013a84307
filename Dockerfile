# repro-merge in a container: the pinned, hash-locked stack on Debian bookworm's Python 3.11.
#
#   .tools/bin/nox -s image        # base (if missing) + wheelhouse + this build -> repro-merge:latest
#   .tools/bin/nox -s image -- --fixed-created   # same, creation times = SOURCE_DATE_EPOCH: the image
#                                                # ID then depends on the contents only
#   .tools/bin/nox -s image_check  # two --no-cache builds, filesystems and layers compared
#   docker run --rm --user "$(id -u):$(id -g)" \
#       -v /data/llama:/models/llama:ro -v /data/lora:/models/lora:ro -v "$PWD/out":/out \
#       repro-merge 13B alpaca-plus                 # = repro-merge build 13B alpaca-plus
#   docker run --rm repro-merge tiny alpaca-plus    # the embedded tiny target, nothing mounted
#
# --user "$(id -u):$(id -g)" makes the files written to the /out mount belong to the caller; without it
# the container runs as uid 1000 ("merge"), never as root.
#
# Build inputs (no registry and no package index is needed except Debian's apt mirror):
#  - BASE: pinned by digest to debian:bookworm-slim (Debian 12.9, the digest `docker inspect` reported
#    for debian:bookworm-slim and debian:12.9-slim in Feb. 2025, as public Dockerfiles pin it). With
#    it, RUNTIME_PACKAGES adds Python 3.11 (the slim image has none). Where that digest cannot be
#    pulled (no registry reachable, as here and in our CI), `nox -s image` builds the same kind of
#    base locally and reproducibly with debootstrap (docker/make-base.sh) and passes
#      --build-arg BASE=repro-merge-base:bookworm --build-arg RUNTIME_PACKAGES=libsentencepiece0
#    (that base has python3 already). Either way Python is Debian's python3 package, never a
#    python.org build. The registry route is untested here (no registry is reachable from this
#    machine); expect /etc's mtime to vary between builds with it: the slim image has no /etc/hosts
#    (see docker/normalize-layer.sh).
#  - docker/wheelhouse/: every file of lockfiles/runtime.txt for cp311/manylinux, hash-checked when it
#    was downloaded (`nox -s wheelhouse`) and again here, where pip runs with --no-index --require-hashes.
#
# Never add a "syntax=" parser directive: it makes BuildKit pull a frontend image from a registry.
# RUN --mount (bind) is supported by Docker 20.10's built-in frontend.

ARG BASE=debian:bookworm-slim@sha256:12c396bd585df7ec21d5679bb6a83d4878bc4415ce926c9e5ea6426d23c60bdc
# 2023-06-10T00:00:00Z, Debian 12's release day; the same default as docker/make-base.sh.
ARG SOURCE_DATE_EPOCH=1686355200

# ---------------------------------------------------------------------------------------------------
# sentencepiece 0.1.97 has no cp311 wheel: build it from the lock's sdist against Debian's
# libsentencepiece-dev (0.1.97, found through pkg-config); the sdist carries no C++ sources.
FROM ${BASE} AS spbuild
ARG SOURCE_DATE_EPOCH
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 TZ=UTC SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH} \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential pkg-config libsentencepiece-dev python3-dev python3-venv \
 && python3 -m venv /opt/build
COPY lockfiles/runtime.txt docker/lockfilter.py /build/
# The lock is split here, from the committed file itself (docker/lockfilter.py), not from a copy:
#  - build-tools.txt: setuptools + wheel, the lock's own pins, to build without an isolated env;
#  - sentencepiece.txt: the hashes the sdist must match;
#  - runtime-wheels.txt: everything else, installed as-is in the runtime stage.
# The sdist is unpacked at a FIXED path (not pip's random /tmp/pip-req-build-*), because the build
# directory can end up in the compiled extension (debug info, the compiler's -g from Python's
# sysconfig): a random one could change the .so's bytes. So pip does not check its hash while building
# it; sha256sum does, against the lock's hashes for sentencepiece.
RUN --mount=type=bind,source=docker/wheelhouse,target=/wheelhouse \
    set -eu; cd /build; mkdir /dist \
 && python3 lockfilter.py runtime.txt --only setuptools wheel >build-tools.txt \
 && python3 lockfilter.py runtime.txt --only sentencepiece >sentencepiece.txt \
 && python3 lockfilter.py runtime.txt --exclude sentencepiece >/dist/runtime-wheels.txt \
 && /opt/build/bin/pip install --no-index --find-links /wheelhouse --require-hashes --no-deps \
        -r build-tools.txt \
 && sdist=$(ls /wheelhouse/sentencepiece-*.tar.gz) \
 && sum=$(sha256sum "$sdist" | cut -d' ' -f1) \
 && { grep -q "sha256:$sum" sentencepiece.txt \
      || { echo "$sdist: sha256 $sum is not in lockfiles/runtime.txt" >&2; exit 1; }; } \
 && tar -xzf "$sdist" -C /build \
 && /opt/build/bin/pip wheel --no-index --no-build-isolation --no-deps -w /dist /build/sentencepiece-*/

# ---------------------------------------------------------------------------------------------------
# The project's own wheel, in its own stage so that editing src/ rebuilds only this and the last layer.
# The tree is laid out as in the repository because package data in src/repro_merge are symlinks to
# files at the root (SHA256.md -> ../../SHA256.md, runtime-lock.txt -> ../../lockfiles/runtime.txt);
# setuptools copies their targets' contents into the wheel. (SHA256.m[d] is a pattern so that a tree
# without the file still builds.)
FROM spbuild AS appbuild
COPY pyproject.toml README.md SHA256.m[d] /build/repro-merge/
COPY lockfiles/runtime.txt /build/repro-merge/lockfiles/
COPY src /build/repro-merge/src
RUN rm -rf /dist && mkdir /dist \
 && /opt/build/bin/pip wheel --no-index --no-build-isolation --no-deps -w /dist /build/repro-merge

# ---------------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime
ARG SOURCE_DATE_EPOCH
# apt packages added to the base: only what is not in it already. The debootstrap base has python3 and
# python3-venv, so it is given libsentencepiece0 alone (naming the others would upgrade them to the
# mirror's current point release).
ARG RUNTIME_PACKAGES="libsentencepiece0 python3 python3-venv"

# Every RUN below ends with docker/normalize-layer.sh (read its header): it deletes what records the
# build's wall clock (apt lists and caches, logs, ldconfig's aux-cache, "-old" backups), fixes
# /etc/shadow's "last change" day and clamps every mtime newer than SOURCE_DATE_EPOCH to it, so that
# each layer has the same bytes on every build (Docker 20.10's BuildKit clamps nothing). The build
# context's docker/ folder is bind-mounted on /srv, a stage's output on /media: both directories exist
# (empty) in the base, because BuildKit would create a missing mount target and leave it behind.
# Nothing here is set with ENV, so no build-only variable reaches the image's configuration.

# The only system library the stack needs beyond the base: sentencepiece's shared library (the wheel
# built above links to it). The user "merge" (uid/gid 1000) runs the tool by default; -l keeps it out
# of lastlog/faillog. /out is world-writable (sticky, like /tmp) so that `--user ANY` works even when
# nothing is mounted there. The stdlib is byte-compiled (hash-based .pyc, see below): the base ships
# none, and the interpreter cannot write them as a non-root user, so each start would recompile.
RUN --mount=type=bind,source=docker,target=/srv \
    apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $RUNTIME_PACKAGES \
 && dpkg-query -W >/usr/share/repro-merge-packages.txt \
 && useradd -l --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /bin/bash merge \
 && install -d -m 0755 /models /models/llama /models/lora \
 && install -d -m 1777 /out \
 && python3 -m compileall -q -f -j 1 --invalidation-mode checked-hash /usr/lib/python3.11 >/dev/null \
 && sh /srv/normalize-layer.sh

# The venv at /opt/repro-merge gets exactly lockfiles/runtime.txt (hash-checked, no index) and
# nothing else: it is created --without-pip and pip runs from Debian's bundled wheel, so no unpinned
# pip/setuptools is left behind. sentencepiece is the exception: the lock's hashes are those of the
# sdist (and of other platforms' wheels), and the wheel built from it in the spbuild stage has a
# different hash, so it cannot pass --require-hashes; its sdist was checked against the lock instead
# and the wheel is installed by path with --no-deps. .pyc files: --no-compile for pip, then
# compileall with hash-based pycs (checked-hash: validated against the source's hash, not its mtime)
# so the bytes do not depend on when the files were written.
RUN --mount=type=bind,source=docker,target=/srv \
    --mount=type=bind,from=spbuild,source=/dist,target=/media \
    pip="/opt/repro-merge/bin/python $(ls -d /usr/share/python-wheels/pip-*.whl)/pip" \
 && python3 -m venv --without-pip /opt/repro-merge \
 && $pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /srv/wheelhouse \
        --require-hashes --no-deps --no-compile -r /media/runtime-wheels.txt \
 && $pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps --no-compile \
        /media/sentencepiece-*.whl \
 && /opt/repro-merge/bin/python -m compileall -q -f -j 1 --invalidation-mode checked-hash \
        /opt/repro-merge/lib >/dev/null \
 && sh /srv/normalize-layer.sh

# The project wheel (no deps: the stack above is the lock), in its own small layer.
RUN --mount=type=bind,source=docker,target=/srv \
    --mount=type=bind,from=appbuild,source=/dist,target=/media \
    pip="/opt/repro-merge/bin/python $(ls -d /usr/share/python-wheels/pip-*.whl)/pip" \
 && $pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps --no-compile \
        /media/repro_merge-*.whl \
 && /opt/repro-merge/bin/python -m compileall -q -f -j 1 --invalidation-mode checked-hash \
        /opt/repro-merge/lib/python3.11/site-packages/repro_merge >/dev/null \
 && PYTHONDONTWRITEBYTECODE=1 /opt/repro-merge/bin/python \
        -c "import torch, transformers, peft, sentencepiece, repro_merge" \
 && sh /srv/normalize-layer.sh

# Run-time environment. Each variable pins something that would otherwise come from the host/caller.
ENV PATH=/opt/repro-merge/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    # One BLAS/OpenMP thread. The bytes do not depend on it: the orders seq and fma are computed
    # element by element in a fixed order (arith.py: a numba kernel compiled without fast-math, so
    # no FMA contraction or reordering) and parallelised over rows by repro-merge's own pool
    # (REPRO_MERGE_THREADS, default = CPU count). Pinned anyway, so that torch/OpenBLAS do not
    # oversubscribe that pool and a `--order host` diagnosis does not vary with the core count.
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    # MKL_DEBUG_CPU_TYPE is deliberately NOT set: the default arithmetic does not go through MKL at
    # all (it computes the summation order MKL's generic path uses itself), and `--order host` shows
    # what this CPU's BLAS gives, so forcing an MKL code path would defeat it.
    # Fixed timestamps for anything that honours it (py_compile then writes hash-based pycs;
    # setuptools, zip and tar writers); repro-merge's outputs do not embed the wall clock in any case.
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH} \
    # UTF-8 I/O and byte-order (C) collation whatever the caller's locale; no locales package needed.
    LANG=C.UTF-8 \
    # Times printed in logs are UTC, whatever the host's zone.
    TZ=UTC \
    # Fixed str hashing: set/dict iteration orders (and anything written from them) repeat run to run.
    PYTHONHASHSEED=0 \
    # The image's .pyc files are precompiled; never write new ones into the container at run time.
    PYTHONDONTWRITEBYTECODE=1 \
    # Progress lines reach `docker logs` at once.
    PYTHONUNBUFFERED=1 \
    # Never contact the Hugging Face hub: every input is a mounted folder (or the embedded fixtures).
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    # A writable HOME (and so ~/.cache) for any uid, including `--user $(id -u):$(id -g)`.
    HOME=/tmp \
    # Where the inputs are mounted and where outputs go (read by `repro-merge build`).
    REPRO_MERGE_LLAMA=/models/llama \
    REPRO_MERGE_LORA=/models/lora \
    REPRO_MERGE_OUT=/out

# /models/llama: the original LLaMA root (tokenizer.model, 7B/, 13B/, 30B/); /models/lora: adapter
# folders as released (e.g. chinese_alpaca_plus_lora_13b); /out: the outputs.
WORKDIR /out
# Numeric, so that runAsNonRoot-style checks can verify it without reading /etc/passwd.
USER 1000:1000
ENTRYPOINT ["repro-merge", "build"]
