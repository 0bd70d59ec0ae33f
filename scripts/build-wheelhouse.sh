#!/usr/bin/env bash
# Build an offline wheelhouse (default .whl/) for the container images, with the host's pip.
#
# Why: image builds here (and on air-gapped build hosts) reach no package index, so the
# Dockerfiles' `WHEELS=local` mode installs only from this folder with `pip --no-index`.
# It holds exactly the files the images' hashed locks name (docs/deploy.md, "Locked
# dependencies"): locks/torch.txt (CPU torch), locks/images.txt (the three torch images, with
# the model wheels and the setuptools that builds the project's own packages) and
# locks/detector.txt + detector-int8.txt (the torch-free detector). pip downloads them with
# --require-hashes, so a file that differs from the lock is refused here, not in the image.
# Knobs: WHEELHOUSE (output folder), PYTHON (interpreter whose pip is used),
# TORCH_INDEX_URL (extra index for torch, e.g. https://download.pytorch.org/whl/cpu),
# FEDDALE_EXTRAS (the core's extras of the torch images, e.g. cuda: adds locks/images-cuda.txt
# and the CUDA torch from TORCH_INDEX_URL, which no lock hashes).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${WHEELHOUSE:-$ROOT/.whl}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
EXTRAS="${FEDDALE_EXTRAS:-}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

LOCKS=(locks/images.txt locks/detector.txt locks/detector-int8.txt)
[[ -n "$EXTRAS" ]] && LOCKS+=("locks/images-${EXTRAS//,/-}.txt")
CUDA=0
case ",$EXTRAS," in *,cuda,*) CUDA=1 ;; *) LOCKS+=(locks/torch.txt) ;; esac
for lock in "${LOCKS[@]}"; do [[ -f "$lock" ]] || { echo "build-wheelhouse: no $lock (make lock)" >&2; exit 1; }; done
EXTRA=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && EXTRA+=(--extra-index-url "$TORCH_INDEX_URL")

# pip evaluates environment markers with the host's interpreter, never the target's, so the locks
# are first rewritten for the images' one: CPython 3.11 on x86-64 Linux, any 3.11.x (Debian
# bookworm's python3 is 3.11.2 and needs redis's async-timeout back-port; newer 3.11 images skip it).
# Requirements whose marker holds there are kept without it; the others are dropped. The file also
# lists every allowed hash, to prune stale files (e.g. a locally built wheel of a locked version).
"$PYTHON" - "$TMP/target.txt" "$TMP/hashes.txt" "${LOCKS[@]}" <<'PY'
import sys
try:
    from packaging.markers import Marker
except ImportError:  # a bare interpreter: pip's own copy
    from pip._vendor.packaging.markers import Marker

target, hashes_out, *locks = sys.argv[1:]
base = {"os_name": "posix", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
        "implementation_name": "cpython", "platform_python_implementation": "CPython", "python_version": "3.11"}
envs = [dict(base, python_full_version=v, implementation_version=v) for v in ("3.11.0", "3.11.2", "3.11.99")]
entries, hashes = {}, set()
for lock in locks:
    current = ""
    for raw in open(lock).read().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        words = current.split()
        current = ""
        digests = [w for w in words if w.startswith("--hash=")]
        requirement, _, marker = " ".join(w for w in words if not w.startswith("--hash=")).partition(";")
        hashes.update(d.removeprefix("--hash=sha256:") for d in digests)
        if marker.strip() and not any(Marker(marker.strip()).evaluate(env) for env in envs):
            continue
        entry = " ".join([requirement.strip(), *digests])
        name = requirement.split("==")[0].strip().lower()
        if entries.setdefault(name, entry) != entry:
            sys.exit(f"build-wheelhouse: two locks pin {name} differently (make lock)")
open(target, "w").write("\n".join(entries.values()) + "\n")
open(hashes_out, "w").write("\n".join(sorted(hashes)) + "\n")
PY

mkdir -p "$OUT"
echo "build-wheelhouse: $(wc -l <"$TMP/target.txt") locked requirements from ${LOCKS[*]} -> $OUT" >&2
# Wheels for the images' interpreter, not the host's: CPython 3.11 on glibc >= 2.28.
# pip does not widen a --platform to older glibc tags by itself, so they are listed.
TARGET=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none)
for glibc in 2_28 2_27 2_17 2_12 2_5; do TARGET+=(--platform "manylinux_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
# Pure-Python packages published only as source (no wheel on the index): their locked sdist goes in
# the wheelhouse (the image builds it, with the locked setuptools that is in the wheelhouse too).
SDIST_ONLY=drain3
# Stale files (other builds of a locked version) would be picked and then fail the hash check.
if [[ $CUDA == 0 ]]; then
    for f in "$OUT"/*; do
        [[ -f "$f" ]] || continue
        grep -qx "$(sha256sum "$f" | cut -d' ' -f1)" "$TMP/hashes.txt" || { echo "build-wheelhouse: removing stale ${f##*/}" >&2; rm -f "$f"; }
    done
fi
"$PYTHON" -m pip download -q --no-deps --require-hashes "${TARGET[@]}" --no-binary "$SDIST_ONLY" \
    -d "$OUT" "${EXTRA[@]}" -r "$TMP/target.txt"
if [[ $CUDA == 1 ]]; then
    # CUDA torch and its nvidia-* libraries: by version from TORCH_INDEX_URL, not hashed (no lock has them).
    TORCH_VERSION="$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' locks/torch.txt)"
    "$PYTHON" -m pip download -q "${TARGET[@]}" -d "$OUT" "${EXTRA[@]}" "torch==$TORCH_VERSION"
elif ! ls "$OUT"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    echo "build-wheelhouse: no CPU torch wheel in $OUT" >&2; exit 1
fi
du -sh "$OUT" >&2
