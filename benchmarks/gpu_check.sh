#!/usr/bin/env bash
# One-call GPU check (issue 15): the GPU tests (tests/test_gpu.py: every registered module's fit + test in
# 32, bf16-mixed and 16-mixed, and second-order MAML in 16-mixed without NaNs), then benchmarks/maml_speed.py
# and benchmarks/protonet_speed.py on the GPU against learn2learn; everything as markdown in
# $OUT/gpu_check.md (benchmarks/gpu_check_results.md when $OUT is unset). Each stage has a timeout, cut
# further so that everything ends within 470 s of the start (under 8 minutes): package setup (learn2learn's
# build at most 90 s), pytest 200 s, ProtoNet 45 s, MAML what is left (up to 230 s; its rows stream out, so a
# cut run still reports the rows it finished).
#
# The device machine (see /work/.library/device/README.md and KINDS.md) reaches no package registry, and
# our .venv (~5 GB, Python 3.11) is too big to carry and built for another Python. What works there:
# its own python3 (3.12, torch, lightning, torchmetrics, tensorboard, pillow, pytest, cython are installed)
# with PYTHONPATH=. instead of installing this package, plus what it lacks carried as files:
# jsonargparse and its signature extras (wheels), easyfsl (wheel), learn2learn 0.2.0 (sdist, built there
# with its Cython, best effort: its rows say "failed" if that build fails), and the real Omniglot zips
# (../shared does not travel). `--prepare` gathers all of that here, once, into .gpu_carry/ (ignored via
# .git/info/exclude, ~20 MB):
#
#   bash benchmarks/gpu_check.sh --prepare
#
# Then the lead's device call (run tool):
#   command:   bash benchmarks/gpu_check.sh --device cuda
#   carry:     [".gpu_carry"]
#   timeout_s: 540
#
# --reproduce (issue 22): instead of the tests and speed rows, continue the longest unfinished reproduction
# rows (MAML 20w1s, MAML++ 20w1s) from their committed ledgers and resume checkpoints in
# benchmarks/reproduction/ for about 3 minutes each on the device, test their best checkpoints, and write the
# updated ledgers and checkpoints to $OUT/reproduction (copy them over benchmarks/reproduction/ here, then
# `python benchmarks/reproduce.py --table`):
#   command:   bash benchmarks/gpu_check.sh --device cuda --reproduce
#
# Here, to test the script itself on the CPU (LIGHTNING_META_TEST_ACCELERATOR=cpu: same tests, 16-mixed
# skipped since Lightning does not run it on CPU; benchmarks with --steps 1 and fewer settings):
#   bash benchmarks/gpu_check.sh --device cpu --quick      # --quick: the tests of 2 registry entries only
set -uo pipefail

DEVICE=cuda
QUICK=0
PREPARE=0
REPRODUCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --prepare) PREPARE=1; shift ;;
        --reproduce) REPRODUCE=1; shift ;;
        *) echo "unknown argument $1 (use --device cpu|cuda, --quick, --prepare, --reproduce)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "--device must be cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac

DEADLINE=$(($(date +%s) + 470))
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
CARRY="$REPO/.gpu_carry"

if [ "$PREPARE" = 1 ]; then
    mkdir -p "$CARRY/whl" "$CARRY/data/omniglot" .git/info
    grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >>.git/info/exclude
    src="${LIGHTNING_META_DATA:-$REPO/../shared/data}/omniglot"
    cp "$src/images_background.zip" "$src/images_evaluation.zip" "$CARRY/data/omniglot/"
    pip=(python3 -m pip download --quiet --no-deps -d "$CARRY/whl")
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64)
    "${pip[@]}" "${plat[@]}" jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 \
        importlib_resources easyfsl gym_notices
    "${pip[@]}" --no-binary :all: learn2learn==0.2.0 gym==0.26.2 qpth
    du -sh "$CARRY"
    ls "$CARRY/whl"
    exit 0
fi

# Python: the checkout's .venv where it works (here), else the machine's python3 with PYTHONPATH=. and the
# carried packages unpacked into /tmp/site (no index is ever contacted).
if [ -x .venv/bin/python ] && .venv/bin/python -c "import lightning_meta" 2>/dev/null; then
    PY=.venv/bin/python
    SETUP="checkout's .venv"
else
    PY=python3
    export PYTHONPATH="$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
    SETUP="machine's python3, PYTHONPATH=."
    if [ -d "$CARRY/whl" ]; then
        mkdir -p /tmp/site /tmp/l2l
        pipi=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site)
        "${pipi[@]}" "$CARRY"/whl/*.whl || echo "WARNING: carried wheels did not install"
        for sdist in "$CARRY"/whl/gym-*.tar.gz "$CARRY"/whl/qpth-*.tar.gz; do
            [ -e "$sdist" ] && { "${pipi[@]}" --no-build-isolation "$sdist" >/dev/null 2>&1 || echo "WARNING: $sdist"; }
        done
        if [ -e "$CARRY"/whl/learn2learn-0.2.0.tar.gz ]; then
            # Its shipped Cython C files include a header that Python 3.11+ removed: regenerate them (cython there).
            tar xzf "$CARRY"/whl/learn2learn-0.2.0.tar.gz -C /tmp/l2l && rm -f /tmp/l2l/learn2learn-0.2.0/learn2learn/data/*.c
            timeout 90 "${pipi[@]}" --no-build-isolation /tmp/l2l/learn2learn-0.2.0 >/tmp/l2l/build.log 2>&1 \
                || echo "WARNING: learn2learn did not build here ($(tail -1 /tmp/l2l/build.log)); its rows will fail"
        fi
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
        SETUP="$SETUP, carried packages in /tmp/site"
    fi
fi

# Data: $LIGHTNING_META_DATA, else the first of ../shared/data, shared/data, .gpu_carry/data with Omniglot.
if [ -z "${LIGHTNING_META_DATA:-}" ]; then
    for d in "$REPO/../shared/data" "$REPO/shared/data" "$CARRY/data"; do
        if [ -e "$d/omniglot/images_background.zip" ]; then export LIGHTNING_META_DATA="$(cd "$d" && pwd)"; break; fi
    done
fi
if [ -e "${LIGHTNING_META_DATA:-/nonexistent}/omniglot/images_background.zip" ]; then
    DATA="real Omniglot in $LIGHTNING_META_DATA"
else
    DATA="NO real Omniglot found (../shared/data, shared/data, .gpu_carry/data): tests/conftest.py skips every test that needs it"
fi

if [ -n "${OUT:-}" ]; then REPORT="$OUT/gpu_check.md"; else REPORT="$REPO/benchmarks/gpu_check_results.md"; fi
mkdir -p "$(dirname "$REPORT")"
LOG="$(mktemp -d)"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
    export LIGHTNING_META_TEST_ACCELERATOR=gpu
    MAML_ARGS=(--steps 5)
    PROTO_ARGS=(--steps 10)
else
    export LIGHTNING_META_TEST_ACCELERATOR=cpu
    MAML_ARGS=(--steps 1 --settings omniglot_5w1s --variants "learn2learn fp32" "ours batched fp32")
    PROTO_ARGS=(--steps 1 --shapes 5w5s15q)
fi
TEST_ARGS=(-q -p no:cacheprovider --disable-warnings --durations=8 tests/test_gpu.py)
[ "$QUICK" = 1 ] && TEST_ARGS+=(-k "ProtoNet or (MAML and not PlusPlus)")

# One stage: its command, exit status and wall time, and its output in a code block.
stage() {
    local title="$1" limit="$2"
    shift 2
    local start rc left
    start=$(date +%s)
    left=$((DEADLINE - start))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        printf '\n## %s\n\nnot run: the 470 s budget is spent\n' "$title" >>"$REPORT"
        echo "$title: not run (budget spent)"
        return
    fi
    timeout -k 10 "$limit" "$@" >"$LOG/out" 2>&1
    rc=$?
    {
        echo
        echo "## $title"
        echo
        echo "\`$*\` (timeout ${limit} s): exit $rc$([ $rc = 124 ] && echo ' TIMED OUT'), $(($(date +%s) - start)) s"
        echo
        echo '```'
        tail -c 20000 "$LOG/out"
        echo '```'
    } >>"$REPORT"
    echo "$title: exit $rc"
}

{
    echo "# GPU check ($DEVICE), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (+ uncommitted changes)')"
    else
        echo "- commit: unknown (no .git in this copy of the working tree)"
    fi
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    echo "- $($PY -c 'import torch, lightning, platform; print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, available {torch.cuda.is_available()}), lightning {lightning.__version__}")' 2>&1 | tail -1)"
    echo "- cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(grep -qw amx_bf16 /proc/cpuinfo && echo AMX || echo 'no AMX'), $(nproc) cores"
    echo "- python setup: $SETUP; data: $DATA"
    echo "- LIGHTNING_META_TEST_ACCELERATOR=$LIGHTNING_META_TEST_ACCELERATOR$([ "$QUICK" = 1 ] && echo ', --quick (2 registry entries)')"
    $PY -c "import learn2learn" >/dev/null 2>&1 || echo "- learn2learn: NOT importable: its benchmark rows fail, and maml_speed.py then prints each variant's ratio to itself (1.00x): ignore those"
} >"$REPORT"

if [ "$REPRODUCE" = 1 ]; then
    RUNS="$(mktemp -d)"
    # --quick: a few meta-batches each, to test this mode itself on the CPU.
    if [ "$QUICK" = 1 ]; then BUDGET=(--meta_batches 2 --test_episodes 20); else BUDGET=(--hours 0.05); fi
    for config in configs/maml/omniglot_20w1s.yaml configs/mamlpp/omniglot_20w1s.yaml; do
        stage "Reproduction: $config" 220 "$PY" benchmarks/reproduce.py "$config" "${BUDGET[@]}" --runs "$RUNS" \
            --data_root "$LIGHTNING_META_DATA/omniglot" --threads "$(nproc)"
    done
    "$PY" benchmarks/reproduce.py --runs "$RUNS" --commit
    mkdir -p "${OUT:-$REPO/benchmarks/gpu_check_reproduction}"
    cp -r benchmarks/reproduction "${OUT:-$REPO/benchmarks/gpu_check_reproduction}/"
    echo "total: $(($(date +%s) - DEADLINE + 470)) s" | tee -a "$REPORT"
    echo "report: $REPORT; ledgers and checkpoints: ${OUT:-$REPO/benchmarks/gpu_check_reproduction}/reproduction"
    exit 0
fi

stage "GPU tests (tests/test_gpu.py)" 200 "$PY" -m pytest "${TEST_ARGS[@]}"
stage "ProtoNet speed" 45 "$PY" benchmarks/protonet_speed.py --device "$DEVICE" "${PROTO_ARGS[@]}"
stage "MAML speed" 230 "$PY" benchmarks/maml_speed.py --device "$DEVICE" "${MAML_ARGS[@]}"
echo "total: $(($(date +%s) - DEADLINE + 470)) s" | tee -a "$REPORT"
rm -rf "$LOG"
echo "report: $REPORT"
