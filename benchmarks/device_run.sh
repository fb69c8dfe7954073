#!/usr/bin/env bash
# One device call: install, compile, test, benchmark. Usage: bash benchmarks/device_run.sh [steps...]
# steps: check (kernel_check correctness), time (kernel_check timing), profile (per-kernel times of one
# backward), forward (the forward against cuBLAS, per kernel, by split length; FORWARD_ARGS), blocking
# (the backward under several chunk / dE-accumulator budgets; BLOCKING_ARGS), variants (Hopper forward variants; VARIANT_ARGS, e.g. --baseline old/lce_hopper.cu),
# gpu (pytest -m gpu; GPU_TESTS: extra pytest arguments), scale (benchmarks/scale.py, 2+ GPUs; SCALE_ARGS, SCALE_BUDGET), cold
# (benchmarks/cold_start.py from a wheel built here), compare (benchmarks/compare_commits.py), logits (logits-level benchmark), train (examples/, issue 6),
# trained_lm (train the README's model 300 steps, save a held batch's states to $OUT/trained_lm.npz and export
# CCE_TRAINED_LM, so a later bench step of the same call adds data trained_lm), train_filter (the same training
# with filter_eps="auto", after trained_lm; plots both), bench (all providers; extra
# bench.py arguments in BENCH_ARGS), bench32 (fp32 forward, exact and allow_tf32, against cuBLAS's fp32 and TF32 GEMMs),
# quack_install (QuACK's wheels from .whl-quack/part1 and part2, over two calls; put it before bench)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
PYTHONPATH_DEPS=${PYTHONPATH:-}  # carried wheels only: the cold-start step imports cce_cupy from its wheel
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even when the editable install is refused
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
t0=$(date +%s)
LM_MODEL="--batch 16 --seq 1024 --d-model 1024 --layers 8 --heads 16 --vocab 65536 --dtype bfloat16"  # the README's
# CuPy's compiled-kernel cache from an earlier call (carried as .kcache): unchanged sources skip NVRTC.
CACHE_DIR=${CUPY_CACHE_DIR:-$HOME/.cupy/kernel_cache}
if [ -f .kcache/kcache.tgz ]; then mkdir -p "$CACHE_DIR" && tar -xzf .kcache/kcache.tgz -C "$CACHE_DIR"; fi
# The prebuilt cubins: build the modules whose source changed since the committed set (all CPUs),
# and send the set back when any was built, to commit.
python3 -m cce_cupy.cuda.prebuilt --check >/dev/null || {
  python3 -m cce_cupy.cuda.prebuilt 2>&1 | tail -3 | tee "$OUT/prebuild.log"
  tar -cJf "$OUT/prebuilt.tar.xz" -C cce_cupy/kernels prebuilt
}
# QuACK (a bench peer) is not on the image. benchmarks/dev/stage_quack.sh stages its wheels, in
# pieces, into two carry folders, each with a MANIFEST ("<sha256> <wheel> <pieces...>"). One call
# carries at most 64 MiB, so they come over two calls on one warm machine, in either order: each
# call's folder is kept in /tmp/quack-parts; once every piece is there, the wheels are joined, checked
# and installed with --target, which does not run their .pth files: site.addsitedir runs them to find
# the paths they add (nvidia_cutlass_dsl/dsl_packages), kept in $QUACK_SITE/.pythonpath.
# The folder must be named site-packages: QuACK keys its compiled epilogues by the functions they
# reach, and treats only code under a site-packages or dist-packages folder as installed (keyed by
# name); elsewhere it walks into cutlass's own globals and fails at import ("epilogue fn depends on
# <Logger CUTE_DSL> ... no fail-closed semantic key").
QUACK_SITE=/tmp/quack/site-packages
quack_install() {
  local parts=/tmp/quack-parts wheels=/tmp/quack-wheels site=$QUACK_SITE sum whl pieces p missing=0
  mkdir -p "$parts"
  for d in .whl-quack/part1 .whl-quack/part2; do
    if [ -d "$d" ]; then cp -f "$d"/* "$parts"/ && echo "quack_install: stored $d"; fi
  done
  if [ -f "$site/.pythonpath" ] && cmp -s "$parts/MANIFEST" "$site/.manifest"; then
    echo "quack_install: installed earlier in $site"
    return 0
  fi
  if [ ! -f "$parts/MANIFEST" ]; then
    echo "quack_install: nothing staged: carry .whl-quack/part1 or part2 (bash benchmarks/dev/stage_quack.sh)"
    return 1
  fi
  while read -r sum whl pieces; do
    for p in $pieces; do [ -f "$parts/$p" ] || { echo "quack_install: waiting for $p"; missing=1; }; done
  done <"$parts/MANIFEST"
  if [ "$missing" = 1 ]; then
    echo "quack_install: pieces stored; carry the other .whl-quack part in a later call on this machine"
    return 0
  fi
  rm -rf "$wheels" "$site" && mkdir -p "$wheels"
  while read -r sum whl pieces; do
    (cd "$parts" && cat $pieces) >"$wheels/$whl"
    echo "$sum  $wheels/$whl" | sha256sum -c --quiet || { echo "quack_install: $whl is corrupt"; return 1; }
  done <"$parts/MANIFEST"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
    || return 1
  python3 -c "import site, sys; before = list(sys.path); site.addsitedir('$site')
print(':'.join(p for p in sys.path if p not in before))" >"$site/.pythonpath.new" || return 1
  grep -q dsl_packages "$site/.pythonpath.new" || { echo "quack_install: no dsl_packages path from the .pth"; return 1; }
  cp "$parts/MANIFEST" "$site/.manifest" && mv "$site/.pythonpath.new" "$site/.pythonpath"
  # An import failure is reported here and, as the provider's error record, by bench.py.
  PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(cat "$site/.pythonpath")" python3 -c \
    "import cutlass, quack.linear_cross_entropy; from importlib.metadata import version as v
print('quack_install: quack-kernels', v('quack-kernels'), 'nvidia-cutlass-dsl', v('nvidia-cutlass-dsl'))"
}

rc=0
for step in "$@"; do
  echo "=== $step ($(( $(date +%s) - t0 )) s)"
  case "$step" in
    check) python3 -m benchmarks.dev.kernel_check 2>&1 | tee "$OUT/check.log" || rc=1 ;;
    time)  python3 -m benchmarks.dev.kernel_check --no-check --time 2>&1 | tee "$OUT/time.log" || rc=1 ;;
    profile) python3 -m benchmarks.dev.kernel_profile 2>&1 | tee "$OUT/profile.log" || rc=1 ;;
    forward) python3 -m benchmarks.dev.forward_overhead ${FORWARD_ARGS:-} 2>&1 | tee "$OUT/forward.log" || rc=1 ;;
    blocking) python3 -m benchmarks.dev.backward_blocking ${BLOCKING_ARGS:-} 2>&1 | tee "$OUT/blocking.log" || rc=1 ;;
    variants) python3 -m benchmarks.dev.hopper_variants ${VARIANT_ARGS:-} 2>&1 | tee "$OUT/variants.log" || rc=1 ;;
    gpu)   timeout 400 python3 -m pytest -m gpu -q -rs ${GPU_TESTS:-} 2>&1 | tee "$OUT/gpu_tests.log" || rc=1 ;;
    first_step) # examples/train_lm.py's first step on this machine, empty kernel caches (the README's model)
           CUPY_CACHE_DIR=/tmp/fresh-cupy-cache timeout 300 python3 examples/train_lm.py --loss cce --steps 3 \
             $LM_MODEL --out "$OUT/train_first_step.json" 2>&1 | tail -3 | tee "$OUT/first_step.log" || rc=1
           python3 -c "import json; r = json.load(open('$OUT/train_first_step.json')); print('first step', r['first_step_s'], 's; compile', r['compile_s'], 's')" ;;
    readme_shard) # the shard_map example of docs/sharding.md, exactly as written, on this machine's GPUs
           python3 -c "
import re, pathlib
blocks = re.findall(r'\\\`\\\`\\\`python\\n(.*?)\\\`\\\`\\\`', pathlib.Path('docs/sharding.md').read_text(), re.S)
code = next(b for b in blocks if 'make_vocab_parallel_mesh(tp=2' in b)
ns = {}
exec(compile(code, 'docs/sharding.md shard_map example', 'exec'), ns)
import jax
print('docs/sharding.md shard_map example on', jax.devices(), 'loss', float(ns['loss']), 'dc', ns['dc'].shape)
" 2>&1 | tee "$OUT/readme_shard.log" || rc=1 ;;
    compare) # before/after: the CuPy calls of commit COMPARE_BEFORE (default a3f3ec5) against this checkout
           { rm -rf /tmp/old && mkdir -p /tmp/old && git archive "${COMPARE_BEFORE:-a3f3ec5}" | tar -x -C /tmp/old \
             && (cd /tmp && PYTHONPATH=/tmp/old python3 -c "from cce_cupy.kernel_sources import precompile; precompile()") \
             && python3 benchmarks/compare_commits.py --before /tmp/old --after . --out "$OUT/compare.json"; } 2>&1 \
             | tee "$OUT/compare.log" || rc=1 ;;
    scale) # SCALE_ARGS, e.g. "--gpu-counts 2,4,8 --shapes gemma2,llama3,vocab1m"; scale.py starts no new work
           # after SCALE_BUDGET s (default 420) and rewrites the JSON after every shape; the timeout is the backstop
           # under the device's 600 s a call; the plot is drawn from whatever the JSON holds
           ( timeout 540 python3 benchmarks/scale.py --out "$OUT/scale.json" --budget-s "${SCALE_BUDGET:-420}" \
               ${SCALE_ARGS:-}; st=$?
             if [ -s "$OUT/scale.json" ]; then python3 benchmarks/plot_scale.py "$OUT/scale.json" -o "$OUT/scale.png"; fi
             exit $st ) 2>&1 | tee "$OUT/scale.log" || rc=1 ;;
    cold)  # from a wheel built here, installed outside the checkout, in fresh processes with empty caches
           { rm -rf /tmp/dist /tmp/wheelsite && python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/dist . \
             && ls -l /tmp/dist && python3 -m pip install -q --no-deps --target /tmp/wheelsite /tmp/dist/*.whl \
             && PYTHONPATH=/tmp/wheelsite${PYTHONPATH_DEPS:+:$PYTHONPATH_DEPS} python3 benchmarks/cold_start.py \
                  --out "$OUT/cold.json"; } 2>&1 | tee "$OUT/cold.log" || rc=1 ;;
    logits) timeout 150 python3 benchmarks/bench_logits.py --out "$OUT" 2>&1 | tee "$OUT/logits.log" || rc=1 ;;
    train) M=$LM_MODEL
           { python3 examples/train_lm.py --loss optax --steps 300 $M --out "$OUT/train_optax.json" \
             && python3 examples/train_lm.py --loss cce --steps 300 $M --out "$OUT/train_cce.json" \
             && python3 examples/cupy_pipeline.py \
             && python3 examples/train_lm.py --sweep-vocab 32768,65536,131072,262144,524288 --sweep-steps 5 \
                  --sweep-budget 240 $M --out "$OUT/sweep.json" \
             && python3 examples/plot_train.py --dir "$OUT"; } 2>&1 | tee "$OUT/train.log" || rc=1 ;;
    trained_lm) # issue 14's trained-LM data: the states of a held-out batch after 300 steps
           timeout 400 python3 examples/train_lm.py --loss cce --steps 300 $LM_MODEL --out "$OUT/train_states.json" \
             --save-states "$OUT/trained_lm.npz" 2>&1 | tail -4 | tee "$OUT/trained_lm.log"
           if [ "${PIPESTATUS[0]}" = 0 ] && [ -f "$OUT/trained_lm.npz" ]; then
             export CCE_TRAINED_LM="$OUT/trained_lm.npz"  # bench's default data then include trained_lm
           else rc=1; fi ;;
    train_filter) # issue 14: the same training with the certified filter, after trained_lm (the exact run of this
           # call, whose held-out batch it holds out too), and both loss curves on one plot
           timeout 300 python3 examples/train_lm.py --loss cce --steps 300 $LM_MODEL --filter-eps auto \
             --out "$OUT/train_filter.json" --save-states "$OUT/trained_lm_filter.npz" 2>&1 | tail -3 \
             | tee "$OUT/train_filter.log"
           { [ "${PIPESTATUS[0]}" = 0 ] && python3 examples/plot_filter_train.py "$OUT/train_states.json" \
               "$OUT/train_filter.json" --out "$OUT"; } 2>&1 | tee -a "$OUT/train_filter.log" || rc=1 ;;
    quack_install) # QuACK's staged wheels (see quack_install above); later steps of this call see them
           quack_install 2>&1 | tee "$OUT/quack_install.log"
           [ "${PIPESTATUS[0]}" = 0 ] || rc=1
           if [ -f "$QUACK_SITE/.pythonpath" ]; then
             export PYTHONPATH="$PYTHONPATH:$(cat "$QUACK_SITE/.pythonpath")"
           fi ;;
    bench) python3 benchmarks/bench.py --out "$OUT" --budget-s "${BENCH_BUDGET:-300}" ${BENCH_ARGS:-} 2>&1 \
             | tee "$OUT/bench.log" || rc=1 ;;
    bench32) python3 benchmarks/bench.py --out "$OUT" --dtype float32 --providers cublas,cublas_tf32,ours,ours_tf32 \
               --modes fwd --data uniform,peaked --label fp32 --paired-rounds 0 2>&1 | tee "$OUT/bench32.log" || rc=1 ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
done
echo "=== done ($(( $(date +%s) - t0 )) s), rc=$rc"
exit $rc
