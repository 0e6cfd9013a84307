"""Container sessions: ``wheelhouse``, ``image`` and ``image_check`` (reproducibility of the image).

noxfile.py imports them (``from docker.noxsessions import *`` exports only the sessions, see ``__all__``);
the file also runs on its own: ``.tools/bin/nox -f docker/noxsessions.py -s image``. Every path is
absolute (nox changes into the noxfile's folder). Docker is driven through the 20.10 client
(``$DOCKER``, default /usr/bin/docker) with BuildKit; no container registry is contacted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO

import nox

__all__ = ["wheelhouse", "image", "image_check"]

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "docker"
LOCK = ROOT / "lockfiles" / "runtime.txt"
WHEELHOUSE = HERE / "wheelhouse"  # gitignored; the build context's only large input
CHECK_DIR = ROOT / "out" / "image-check"  # listings and build logs of image_check (out/ is gitignored)
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")  # the 20.10 client (the 28.x one lacks buildx)
LOCAL_BASE = "repro-merge-base:bookworm"  # built by docker/make-base.sh where PINNED_BASE cannot be pulled
# The Dockerfile's default BASE (a digest-pinned debian:bookworm-slim), read from the Dockerfile itself.
PINNED_BASE = re.search(r"^ARG BASE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)  # type: ignore[union-attr]
IMAGE = "repro-merge"
# Packages of the lock that have no cp311 manylinux wheel and are built in the image from their sdist.
SDIST_ONLY = ["sentencepiece"]
# What the builder stage needs to build those and the project wheel without an isolated build env;
# taken from the lock itself (lockfilter fails if they ever leave it).
BUILD_TOOLS = ["setuptools", "wheel"]
# pip without the host's configuration (--isolated drops /etc/xdg/pip constraints, PIP_FIND_LINKS and
# extra index dirs on this machine), hash-checked, one file per pin.
PIP_DOWNLOAD = ["-m", "pip", "download", "--isolated", "--disable-pip-version-check", "--progress-bar", "off"]
PIP_DOWNLOAD += ["--require-hashes", "--no-deps", "-d", str(WHEELHOUSE)]
# The image is bookworm (glibc 2.36). pip does not widen a manylinux_2_X --platform to older tags by itself
# (only manylinux2014 -> 2010 -> 1), so every tag up to the lock's manylinux_2_28 is named.
_TAGS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"]
PLATFORM = [arg for tag in _TAGS for arg in ("--platform", tag)]
PLATFORM += ["--python-version", "3.11", "--implementation", "cp"]


def _lockfilter() -> ModuleType:
    """docker/lockfilter.py, the same code the Dockerfile runs to split the lock."""
    spec = importlib.util.spec_from_file_location("repro_merge_lockfilter", HERE / "lockfilter.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docker_env() -> dict[str, str]:
    """BuildKit on, for the 20.10 client."""
    return {"DOCKER_BUILDKIT": "1"}


def _have_image(ref: str) -> bool:
    return subprocess.run([DOCKER, "image", "inspect", ref], capture_output=True).returncode == 0


def _base_args(session: nox.Session) -> list[str]:
    """docker build arguments for the base: none when the pinned one is here or can be pulled; else the
    local debootstrap base (made by docker/make-base.sh unless already loaded) and its package list."""
    if os.environ.get("REPRO_MERGE_BASE") != "local" and (
        _have_image(PINNED_BASE)
        or subprocess.run([DOCKER, "pull", PINNED_BASE], capture_output=True, timeout=900).returncode == 0
    ):
        session.log(f"base {PINNED_BASE}")
        return []
    session.log(f"{PINNED_BASE} cannot be pulled (or REPRO_MERGE_BASE=local): base {LOCAL_BASE}")
    if not _have_image(LOCAL_BASE):
        session.run(
            "bash", str(HERE / "make-base.sh"), "-t", LOCAL_BASE, env={"DOCKER": DOCKER}, external=True
        )
    return ["--build-arg", f"BASE={LOCAL_BASE}", "--build-arg", "RUNTIME_PACKAGES=libsentencepiece0"]


@nox.session(venv_backend="none")
def wheelhouse(session: nox.Session) -> None:
    """Fill docker/wheelhouse/ with every file of lockfiles/runtime.txt the image needs, hash-checked.

    Binary wheels for cp311/manylinux_2_28 or older (including the build tools setuptools and wheel,
    pinned by the lock), the sdists of SDIST_ONLY; files whose hash the lock does not list are deleted.
    """
    lf = _lockfilter()
    text = LOCK.read_text()
    lf.select(text, BUILD_TOOLS, [])  # fails if the lock stops pinning the build tools
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    tmp = Path(session.create_tmp())
    binary, sdist = tmp / "binary.txt", tmp / "sdist.txt"
    binary.write_text(lf.select(text, None, SDIST_ONLY))
    sdist.write_text(lf.select(text, SDIST_ONLY, []))
    start = time.monotonic()
    if _complete(lf, text):
        session.log(f"wheelhouse complete: every pin of {LOCK.name} has a file with a locked hash")
        return
    py = sys.executable  # nox's own interpreter (.tools); any pip >= 22 does
    session.run(py, *PIP_DOWNLOAD, *PLATFORM, "--only-binary=:all:", "-r", str(binary), external=True)
    # The sdist cannot be fetched with --platform (which needs --only-binary), hence a second call for
    # this interpreter. pip prepares its metadata in an isolated env (downloads setuptools for that):
    # only the hash-checked sdist file is kept.
    session.run(py, *PIP_DOWNLOAD, "--no-binary=:all:", "-r", str(sdist), external=True)
    allowed = {h for h in text.split() if h.startswith("--hash=sha256:")}
    for f in sorted(WHEELHOUSE.iterdir()):
        if f"--hash=sha256:{_sha256(f)}" not in allowed:
            session.log(f"removing {f.name}: its hash is not in {LOCK.name}")
            f.unlink()
    n = sum(1 for _ in WHEELHOUSE.iterdir())
    size = sum(f.stat().st_size for f in WHEELHOUSE.iterdir())
    session.log(f"wheelhouse: {n} files, {size / 2**30:.2f} GiB, {time.monotonic() - start:.0f} s")


def _complete(lf: ModuleType, text: str) -> bool:
    """True if every requirement of the lock has a wheelhouse file whose hash it lists (and nothing else
    is there): then pip need not run (it would only re-check the same hashes)."""
    have = {f"--hash=sha256:{_sha256(f)}" for f in WHEELHOUSE.iterdir()}
    blocks = [set(block.split()) for _, block in lf.blocks(text)]
    return all(b & have for b in blocks) and all(any(h in b for b in blocks) for h in have)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _build(
    session: nox.Session, tag: str, extra: list[str], log: Path | None = None, context: Path = ROOT
) -> float:
    """docker build of CONTEXT (the repository root) as TAG; returns the wall time in seconds. EXTRA
    starts with the base's arguments (``_base_args``)."""
    cmd = [
        DOCKER,
        "build",
        "--progress=plain",
        "-t",
        tag,
        *extra,
        str(context),
    ]
    session.log(" ".join(cmd) + (f"  (log: {log})" if log else ""))
    start = time.monotonic()
    if log is None:
        session.run(*cmd, env=_docker_env(), external=True)
    else:
        with open(log, "w") as out:
            rc = subprocess.run(cmd, env={**os.environ, **_docker_env()}, stdout=out, stderr=out).returncode
        if rc:
            session.error(f"docker build failed ({rc}); see {log}")
    return time.monotonic() - start


@nox.session(venv_backend="none")
def image(session: nox.Session) -> None:
    """Build repro-merge:latest: the base if missing, the wheelhouse, then the Dockerfile.

    `nox -s image -- --no-cache` (or any docker build option) passes options to docker build.
    `-- --fixed-created` then rewrites the image's creation times to SOURCE_DATE_EPOCH (save + load,
    about a minute), so that its image ID depends on its contents only (see ``set_created``).
    """
    args = list(session.posargs)
    fixed = "--fixed-created" in args
    args = [a for a in args if a != "--fixed-created"]
    base = _base_args(session)
    wheelhouse(session)
    tag = f"{IMAGE}:latest"
    took = _build(session, tag, base + args)
    if fixed:
        start = time.monotonic()
        session.log(f"{tag}: {set_created(tag)} ({time.monotonic() - start:.0f} s)")
    size = subprocess.run(
        [DOCKER, "image", "inspect", "-f", "{{.Id}} {{.Size}}", tag], capture_output=True, text=True
    ).stdout.split()
    session.run(DOCKER, "run", "--rm", "--entrypoint", "repro-merge", tag, "--version", external=True)
    session.log(f"built {tag} in {took:.0f} s: {size[0]}, {int(size[1]) / 1e9:.2f} GB")


# The Dockerfile's default SOURCE_DATE_EPOCH (also docker/make-base.sh's).
SOURCE_DATE_EPOCH = 1686355200


def fixed_config(config: bytes, epoch: int = SOURCE_DATE_EPOCH) -> bytes:
    """An image config with every creation time (image and history) set to EPOCH.

    Docker 20.10's BuildKit stamps the wall clock there (it ignores SOURCE_DATE_EPOCH), and the image ID
    is the config's sha256: with the times fixed, the ID depends on the layers and settings only.
    """
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    cfg = json.loads(config)
    cfg["created"] = created
    for h in cfg.get("history", []):
        h["created"] = created
    return json.dumps(cfg, separators=(",", ":")).encode()


def set_created(ref: str, epoch: int = SOURCE_DATE_EPOCH) -> str:
    """Re-tag REF as the same image with fixed creation times (docker save | rewrite | docker load).

    Layers are streamed through unchanged (docker load keeps those it already has); only the config
    (renamed to its new sha256) and manifest.json are rewritten. Returns the new image ID.
    """
    old_id = subprocess.run(
        [DOCKER, "image", "inspect", "-f", "{{.Id}}", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    save = subprocess.Popen([DOCKER, "save", ref], stdout=subprocess.PIPE)
    load = subprocess.Popen([DOCKER, "load", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert save.stdout is not None and load.stdin is not None
    held: dict[str, bytes] = {}
    with (
        tarfile.open(fileobj=save.stdout, mode="r|") as src,
        tarfile.open(fileobj=load.stdin, mode="w|") as dst,
    ):
        for m in src:
            if "/" not in m.name and m.isreg() and (m.name.endswith(".json") or m.name == "repositories"):
                held[m.name] = src.extractfile(m).read()  # type: ignore[union-attr]
            else:
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        manifest = json.loads(held.pop("manifest.json"))
        config = fixed_config(held.pop(manifest[0]["Config"]), epoch)
        name = hashlib.sha256(config).hexdigest() + ".json"
        manifest[0]["Config"] = name
        manifest[0]["RepoTags"] = [ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"]
        held |= {name: config, "manifest.json": json.dumps(manifest).encode()}
        for n, data in held.items():
            info = tarfile.TarInfo(n)
            info.size, info.mtime, info.mode = len(data), epoch, 0o644
            dst.addfile(info, io.BytesIO(data))
    load.stdin.close()
    if save.wait() or load.wait():
        raise RuntimeError(f"re-tagging {ref} with fixed creation times failed")
    new_id = "sha256:" + name.removesuffix(".json")
    if old_id != new_id:  # the build's own image is now untagged; its layers stay (shared)
        subprocess.run([DOCKER, "rmi", old_id], capture_output=True)
    return new_id


def snapshot_context(dest: Path) -> Path:
    """A frozen copy of the build context (wheelhouse hard-linked), so both builds see the same files.

    Other people edit the work tree while image_check runs (a README edit between the two builds
    changes the project wheel's METADATA); building both from one copy compares the builds only.
    """
    skip = shutil.ignore_patterns(".git", ".nox", ".tools", "out", ".*_cache", ".hypothesis", "__pycache__")
    shutil.copytree(
        ROOT,
        dest,
        symlinks=True,
        ignore=lambda d, names: skip(d, names) | ({"wheelhouse"} if Path(d) == HERE else set()),
    )
    (dest / "docker" / "wheelhouse").mkdir()
    for f in WHEELHOUSE.iterdir():
        os.link(f, dest / "docker" / "wheelhouse" / f.name)
    return dest


# --- image_check: build twice from clean, compare what `docker save` holds ---------------------------


@dataclass(frozen=True)
class Entry:
    """One path of a layer or of the flattened filesystem: metadata and content hash."""

    kind: str  # f(ile) d(ir) l(ink) h(ardlink) c/b (device) p (fifo)
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    link: str
    sha256: str

    def line(self, path: str) -> str:
        """The listing line: path type mode uid:gid size mtime link sha256."""
        link = f" -> {self.link}" if self.link else ""
        meta = f"{self.kind} {self.mode:04o} {self.uid}:{self.gid} {self.size} {self.mtime}"
        return f"{path} {meta}{link} {self.sha256}"


@dataclass
class Saved:
    """What `docker save IMAGE` holds: the image ID, the layers (diff IDs, entries) in order."""

    image_id: str = ""
    config: dict = field(default_factory=dict)
    layers: list[tuple[str, dict[str, Entry]]] = field(default_factory=list)  # (sha256 of layer.tar, entries)


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.h = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        self.h.update(b)
        return b

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.h.hexdigest()


_KINDS = {tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l"}
_KINDS |= {tarfile.LNKTYPE: "h", tarfile.CHRTYPE: "c", tarfile.BLKTYPE: "b", tarfile.FIFOTYPE: "p"}


def _layer_entries(stream: IO[bytes]) -> Iterator[tuple[str, Entry]]:
    """(normalized path, Entry) for each member of a layer tar, read as a stream."""
    with tarfile.open(fileobj=stream, mode="r|") as t:
        for m in t:
            sha = ""
            if m.isreg():
                h = hashlib.sha256()
                f = t.extractfile(m)
                assert f is not None
                while block := f.read(1 << 20):
                    h.update(block)
                sha = h.hexdigest()
            link = m.linkname if (m.issym() or m.islnk()) else ""
            kind = _KINDS.get(m.type, "?")
            yield (
                m.name.removeprefix("./").rstrip("/"),
                Entry(kind, m.mode, m.uid, m.gid, m.size, int(m.mtime), link, sha),
            )


def scan_saved(ref: str) -> Saved:
    """Stream `docker save REF` once: config, and every layer's digest and entries (nothing on disk)."""
    proc = subprocess.Popen([DOCKER, "save", ref], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    by_dir: dict[str, tuple[str, dict[str, Entry]]] = {}
    links: dict[str, str] = {}
    manifest: list[dict] = []
    configs: dict[str, bytes] = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
        for m in outer:
            if m.name.endswith("/layer.tar"):
                key = m.name.rsplit("/", 1)[0]
                if m.issym():  # docker save links a repeated layer to its first copy
                    links[key] = m.linkname.split("/")[-2]
                    continue
                f = outer.extractfile(m)
                assert f is not None
                r = _HashingReader(f)
                entries = dict(_layer_entries(r))  # type: ignore[arg-type]
                by_dir[key] = (r.drain(), entries)
            elif m.name == "manifest.json":
                manifest = json.load(outer.extractfile(m))  # type: ignore[arg-type]
            elif m.name.endswith(".json") and "/" not in m.name and m.isreg():
                configs[m.name] = outer.extractfile(m).read()  # type: ignore[union-attr]
    if proc.wait():
        raise RuntimeError(f"docker save {ref} failed")
    cfg_name = manifest[0]["Config"]
    saved = Saved(image_id="sha256:" + hashlib.sha256(configs[cfg_name]).hexdigest())
    saved.config = json.loads(configs[cfg_name])
    for layer in manifest[0]["Layers"]:
        key = layer.rsplit("/", 1)[0]
        saved.layers.append(by_dir[links.get(key, key)])
    return saved


def flatten(layers: list[tuple[str, dict[str, Entry]]]) -> dict[str, tuple[Entry, int]]:
    """The image's filesystem: layers applied in order with OCI whiteouts; path -> (entry, layer index)."""
    fs: dict[str, tuple[Entry, int]] = {}

    def drop_under(prefix: str) -> None:
        for p in [p for p in fs if p.startswith(prefix + "/")]:
            del fs[p]

    for i, (_, entries) in enumerate(layers):
        for path in entries:  # opaque dirs first: they hide the lower layers' contents only
            d, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                drop_under(d)
        for path, e in entries.items():
            d, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                continue
            if base.startswith(".wh."):
                gone = f"{d}/{base[4:]}" if d else base[4:]
                fs.pop(gone, None)
                drop_under(gone)
            else:
                fs[path] = (e, i)
    return fs


def _diff_entries(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two {path: Entry} maps."""
    out = []
    for p in sorted(a.keys() | b.keys()):
        ea, eb = a.get(p), b.get(p)
        if ea == eb:
            continue
        if ea is None or eb is None:
            out.append(f"  only in {'b' if ea is None else 'a'}: {(eb or ea).line(p)}")  # type: ignore[union-attr]
            continue
        fields = [f for f in ("kind", "mode", "uid", "gid", "size", "mtime", "link", "sha256")]
        what = ", ".join(
            f"{f} {getattr(ea, f)} != {getattr(eb, f)}" for f in fields if getattr(ea, f) != getattr(eb, f)
        )
        out.append(f"  {p}: {what}")
    return out


@nox.session(venv_backend="none")
def image_check(session: nox.Session) -> None:
    """Build the image twice with --no-cache and compare both; fails if the filesystems differ.

    Reports image IDs and layer digests (diff IDs) and, for any difference, the paths with what differs
    (type, mode, owner, size, mtime, link target, sha256). Writes the two sorted listings of the
    flattened filesystems and the build logs to out/image-check/. `-- --keep` keeps the two images.
    The base image is not rebuilt here: docker/check-reproducible.sh checks that one.
    """
    keep = "--keep" in session.posargs
    base = _base_args(session)
    wheelhouse(session)
    if CHECK_DIR.exists():
        shutil.rmtree(CHECK_DIR)
    CHECK_DIR.mkdir(parents=True)
    context = snapshot_context(CHECK_DIR / "context")
    tags = {r: f"{IMAGE}:check-{r}" for r in "ab"}
    saved: dict[str, Saved] = {}
    for r, tag in tags.items():
        took = _build(session, tag, [*base, "--no-cache"], CHECK_DIR / f"build-{r}.log", context)
        session.log(f"build {r}: {took:.0f} s")
        saved[r] = scan_saved(tag)
    shutil.rmtree(context)
    a, b = saved["a"], saved["b"]
    fs_a, fs_b = flatten(a.layers), flatten(b.layers)
    for r, fs in (("a", fs_a), ("b", fs_b)):
        with open(CHECK_DIR / f"fs-{r}.txt", "w") as f:
            f.writelines(e.line(p) + "\n" for p, (e, _) in sorted(fs.items()))

    print(
        f"image IDs: a {a.image_id}\n           b {b.image_id}"
        f"  ({'same' if a.image_id == b.image_id else 'differ'})"
    )
    if a.image_id != b.image_id:
        ca, cb = a.config, b.config
        keys = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
        print(f"  config keys that differ: {', '.join(keys)}")
        if "history" in keys:
            hist = [
                k
                for h1, h2 in zip(ca["history"], cb["history"], strict=False)
                for k in h1
                if h1.get(k) != h2.get(k)
            ]
            print(f"  history fields that differ: {', '.join(sorted(set(hist)))}")
        fa, fb = (hashlib.sha256(fixed_config(json.dumps(c).encode())).hexdigest() for c in (ca, cb))
        print(
            f"  with creation times fixed (nox -s image -- --fixed-created): a {fa[:16]} b {fb[:16]} "
            f"({'same' if fa == fb else 'differ'})"
        )
    print("layers (sha256 of the uncompressed layer tar = diff ID):")
    for i, ((da, la), (db, lb)) in enumerate(zip(a.layers, b.layers, strict=False)):
        same = da == db
        print(f"  {i}: {da[:16]} {db[:16]} {'same' if same else 'DIFFER'} ({len(la)} entries)")
        if not same:
            for line in _diff_entries(la, lb)[:50]:
                print("   " + line)
    if len(a.layers) != len(b.layers):
        print(f"  layer count differs: {len(a.layers)} != {len(b.layers)}")

    diff = _diff_entries({p: e for p, (e, _) in fs_a.items()}, {p: e for p, (e, _) in fs_b.items()})
    if not keep:
        subprocess.run([DOCKER, "rmi", *tags.values()], capture_output=True)
    if diff:
        print(f"filesystems DIFFER in {len(diff)} paths (first 200; listings in {CHECK_DIR}):")
        print("\n".join(diff[:200]))
        session.error("the two builds' filesystems differ")
    print(f"filesystems identical: {len(fs_a)} paths (listing: {CHECK_DIR / 'fs-a.txt'})")
