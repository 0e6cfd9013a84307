#!/usr/bin/env bash
# Build the base rootfs twice from clean (no shared cache, separate work dirs)
# and check the two tars are byte-identical. If not, unpack both and list the
# paths whose metadata (type/mode/owner/size/mtime/link target) or content
# (sha256) differ. Plain tools only (no diffoscope).
#
#   docker/check-reproducible.sh            # exit 0 iff identical
# Env: CHECK_DIR (/var/tmp/repro-merge-base-check), plus make-base.sh's env.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
D=${CHECK_DIR:-/var/tmp/repro-merge-base-check}
rm -rf "$D"; mkdir -p "$D"

for r in a b; do
  echo "== build $r"
  start=$(date +%s)
  WORKDIR=$D/work-$r NO_LOAD=1 "$here/make-base.sh" -o "$D/$r.tar"
  echo "== build $r took $(( $(date +%s) - start ))s"
done

sha_a=$(sha256sum "$D/a.tar" | cut -d' ' -f1)
sha_b=$(sha256sum "$D/b.tar" | cut -d' ' -f1)
echo "a.tar sha256 $sha_a"
echo "b.tar sha256 $sha_b"
if [ "$sha_a" = "$sha_b" ]; then
  echo "REPRODUCIBLE: the two base tars are byte-identical"; exit 0
fi

echo "DIFFERENT: comparing unpacked trees"
if ! cmp -s "$D/work-a/packages.txt" "$D/work-b/packages.txt"; then
  echo "-- package list differs (mirror moved between runs?):"
  diff "$D/work-a/packages.txt" "$D/work-b/packages.txt" || true
fi
for r in a b; do
  mkdir -p "$D/x-$r"
  tar -C "$D/x-$r" --numeric-owner -xpf "$D/$r.tar"
  (cd "$D/x-$r" && find . -printf '%p %y %m %U:%G %s %T@ %l\n' | sort >"$D/meta-$r.txt"
   find . -type f -print0 | sort -z | xargs -0 sha256sum >"$D/sum-$r.txt")
done
echo "-- metadata differences (path type mode uid:gid size mtime link):"
diff "$D/meta-a.txt" "$D/meta-b.txt" || true
echo "-- content differences:"
join -j 2 -o 0,1.1,2.1 <(sort -k2 "$D/sum-a.txt") <(sort -k2 "$D/sum-b.txt") \
  | awk '$2 != $3 {print $1}'
echo "-- tar member order/headers (tar -tv) differences:"
diff <(tar --numeric-owner -tvf "$D/a.tar") <(tar --numeric-owner -tvf "$D/b.tar") | head -50 || true
exit 1
