#!/usr/bin/env bash
# Stage QuACK for the device, which has no internet: download the pinned wheels that its image lacks,
# cut them into pieces and lay the pieces into two carry folders, .whl-quack/part1 and part2, each
# small enough to travel beside the working tree in one call (64 MiB a call in all). device_run.sh's
# step quack_install takes the folders in either order, over two calls on one warm machine, joins
# the pieces, checks them against MANIFEST and installs them (benchmarks/README.md, "QuACK").
#
# Usage (here, with PyPI access, from anywhere in the repository): bash benchmarks/dev/stage_quack.sh
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

ROOT=.whl-quack          # ignored by git (.gitignore)
PIECE_MIB=${PIECE_MIB:-48}  # wheels above this are split (only the cu13 libs wheel, 84 MiB)
PART_MIB=${PART_MIB:-56}    # a carry folder's limit: leaves 8 MiB of the 64 for the working tree

# quack-kernels 0.6.5 (2026-09-11, the newest) asks for nvidia-cutlass-dsl >= 4.7; 4.7.1 (2026-08-20)
# is the release it was made with (4.8.0 came a week after it). cutlass-dsl ships as a metapackage and
# three wheels: libs-core (the `cutlass` Python package: without it, "No module named
# cutlass.cutlass_dsl"), libs-base (MLIR bindings) and libs-cu13 (runtime libraries; libs-cu12 is
# not staged, the cu13 flavour alone loads). Its other unpinned needs: apache-tvm-ffi <0.2,
# torch-c-dlpack-ext, nvidia-cuda-nvdisasm 13.x. On the device image already, so not staged: torch,
# triton, einops, numpy, typing-extensions, protobuf, cuda-bindings. The earlier import failures
# ("no fail-closed semantic key") came from the install folder's name, not from these versions:
# device_run.sh's QUACK_SITE says why.
PINS=(
  quack-kernels==0.6.5
  nvidia-cutlass-dsl==4.7.1
  nvidia-cutlass-dsl-libs-core==4.7.1
  nvidia-cutlass-dsl-libs-base==4.7.1
  nvidia-cutlass-dsl-libs-cu13==4.7.1
  apache-tvm-ffi==0.1.13.post3
  torch-c-dlpack-ext==0.1.5
  nvidia-cuda-nvdisasm==13.4.49
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

# One folder per pin, so a wheel of an earlier pin never rides along.
for pin in "${PINS[@]}"; do
  dir="$ROOT/wheels/${pin/==/-}"
  mkdir -p "$dir"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]/#/--platform=}" -d "$dir" "$pin"
  fi
done

# Pieces: every wheel as <wheel>.partNN (one piece unless it is over PIECE_MIB); MANIFEST lines are
# "<sha256 of the wheel> <wheel> <its pieces, in order>".
rm -rf "$ROOT/pieces" "$ROOT/part1" "$ROOT/part2"
mkdir -p "$ROOT/pieces" "$ROOT/part1" "$ROOT/part2"
: >"$ROOT/pieces/MANIFEST"
for whl in "$ROOT"/wheels/*/*.whl; do
  name=$(basename "$whl")
  split -b "${PIECE_MIB}M" -d -a 2 "$whl" "$ROOT/pieces/$name.part"
  echo "$(sha256sum "$whl" | cut -d' ' -f1) $name $(cd "$ROOT/pieces" && ls "$name".part* | tr '\n' ' ')" \
    >>"$ROOT/pieces/MANIFEST"
done

# Largest pieces first, each into part1 while it fits, else part2; both carry the MANIFEST.
limit=$((PART_MIB << 20))
used1=0 used2=0
while read -r size piece; do
  if ((used1 + size <= limit)); then
    mv "$ROOT/pieces/$piece" "$ROOT/part1/" && used1=$((used1 + size))
  elif ((used2 + size <= limit)); then
    mv "$ROOT/pieces/$piece" "$ROOT/part2/" && used2=$((used2 + size))
  else
    echo "stage_quack: $piece ($size bytes) fits in neither part (PART_MIB=$PART_MIB)" >&2
    exit 1
  fi
done < <(cd "$ROOT/pieces" && find . -name '*.part*' -printf '%s %f\n' | sort -rn)
cp "$ROOT/pieces/MANIFEST" "$ROOT/part1/" && cp "$ROOT/pieces/MANIFEST" "$ROOT/part2/"
rm -rf "$ROOT/pieces"

echo "wheels:"
for whl in "$ROOT"/wheels/*/*.whl; do printf '  %10d  %s\n' "$(stat -c %s "$whl")" "$(basename "$whl")"; done
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
for part in part1 part2; do
  size=$(du -sb "$ROOT/$part" | cut -f1)
  awk -v p="$ROOT/$part" -v s="$size" -v t="$tree" 'BEGIN {
    m = 1048576; printf "%s: %d bytes (%.1f MiB); with the working tree (%.1f MiB): %.1f MiB of 64\n", p, s, s / m, t / m, (s + t) / m }'
  ls -l "$ROOT/$part" | tail -n +2 | awk '{printf "    %10d  %s\n", $5, $9}'
done
