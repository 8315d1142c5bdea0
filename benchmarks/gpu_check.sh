#!/usr/bin/env bash
# The first run of nt on a real NVIDIA GPU, in one go: every result lands in one JSON file.
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--python python3] [--budget 540]
#   bash benchmarks/gpu_check.sh --simulate      # the same stages under numba-cuda's simulator,
#                                                # tiny sizes, 6x time boxes: checks this script
#
# Stages, in order, each a process of its own under `timeout`; a stage that fails or runs out
# of time is recorded (exit code, log tail, what it wrote so far) and the next one runs:
#   1 discover   driver, runtime, device, libNVVM/libdevice, cuBLAS loaded and right, versions,
#                nvidia-smi; NUMBA_CACHE_DIR is a fresh folder, so every kernel compiles here
#   2 tests      pytest -m 'not slow' tests/cuda on the device (NUMBA_ENABLE_CUDASIM=0), minus
#                test_ptx.py (CI's compile check, no GPU needed); -v, so a run cut short still
#                leaves its per-test results in the log
#   3 resources  registers / shared / local memory of every kernel as loaded on this GPU
#   4 kernels    bench_kernels.py's CUDA column at B=8, T=1024 (GPT-2 124M layer shapes)
#   5 train      20 float32 steps against the CPU's loss curve (1e-4), and 20 bf16 mixed-precision
#                steps against the same curve (2e-2); GPT-2 d12 B=8 T=1024 step time against
#                summed kernel time (the host's overhead)
#   5b speed     bench_train_cuda.py at d12 B=8 T=1024: nt bf16, nt float32 and PyTorch eager bf16
#                autocast, tokens/s, MFU and peak memory (needs PyTorch; not under --simulate)
#   6 decode     KV-cache decoding: GPT-2 d12 float32, a Llama kept as Q8_0 / Q4_0 blocks
#   7 sanitizer  compute-sanitizer memcheck and racecheck on one tiny step, if installed
# The stages share a time budget (default 540 s, so a 10-minute slot holds the whole run with
# the machine's start); a stage gets at most what is left.
#
# Needs a python3 with numpy, numba, numba-cuda and pytest (the H200 image's python3 has them,
# with PyTorch): nothing is installed and nothing is downloaded. nt itself runs from this
# checkout: src/nt is copied into a scratch folder with kernels/ linked in as nt.kernels, so no
# `pip install` is needed either.
set -u

# the whole run is one function, so bash has read all of it before it starts (an edit to this
# file during a run cannot change what the run does)
main() {
    cd "$(dirname "$0")/.."
    REPO=$(pwd)
    OUT_JSON=gpu_check.json
    PY=${PYTHON:-python3}
    SIM=0
    BUDGET=
    while [ $# -gt 0 ]; do
        case "$1" in
            --out) OUT_JSON=$2; shift 2 ;;
            --python) PY=$2; shift 2 ;;
            --budget) BUDGET=$2; shift 2 ;;
            --simulate) SIM=1; shift ;;
            *) echo "usage: $0 [--out FILE] [--python PY] [--budget SECONDS] [--simulate]" >&2; exit 2 ;;
        esac
    done

    WORK=$(mktemp -d /tmp/nt_gpu_check.XXXXXX)
    export NUMBA_CACHE_DIR=$WORK/numba_cache NUMBA_ENABLE_CUDASIM=$SIM PYTHONUNBUFFERED=1
    mkdir -p "$WORK/site/nt"
    cp -R src/nt/. "$WORK/site/nt/"
    ln -s "$REPO/kernels" "$WORK/site/nt/kernels"
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    START=$(date +%s)
    SCALE=1
    [ "$SIM" = 1 ] && SCALE=6   # the simulator runs each GPU thread as a Python thread
    BUDGET=${BUDGET:-$((540 * SCALE))}
    : > "$WORK/stages.tsv"

    # stage NAME BOX COMMAND...: run under timeout (at most BOX s, at most what the budget has left)
    stage() {
        local name=$1 box=$2 left rc t0
        shift 2
        box=$((box * SCALE))
        left=$((START + BUDGET - $(date +%s)))
        [ "$box" -gt "$left" ] && box=$left
        if [ "$box" -lt 10 ]; then
            printf '%s\t-1\t0\tskipped: time budget spent\n' "$name" >> "$WORK/stages.tsv"
            echo "== $name: skipped (time budget spent)"
            return
        fi
        echo "== $name (at most ${box} s)"
        t0=$(date +%s%N)
        timeout -k 10 "$box" "$@" > "$WORK/$name.log" 2>&1
        rc=$?
        local status=ok
        [ $rc -ne 0 ] && status=failed
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed out after ${box} s"
        printf '%s\t%d\t%d\t%s\n' "$name" "$rc" $((($(date +%s%N) - t0) / 1000000)) "$status" >> "$WORK/stages.tsv"
        tail -n 4 "$WORK/$name.log"
    }

    G=benchmarks/gpu
    if [ "$SIM" = 1 ]; then   # tiny sizes: the simulator runs each GPU thread as a Python thread
        SIMFLAG=--simulate
        TESTS=(tests/cuda/test_quant_cuda.py -k "dequantize or bad_shapes")
        KERNELS=(--B 1 --T 8 --C 32 --NH 2 --V 64 --reps 1 --limit 3)
        TRAIN=(--preset tiny --layers 1 --B 1 --T 4 --V 32 --steps 2 --time_preset tiny --time_B 1 --time_T 4 --time_steps 1 --profiled 1)
        DECODE=(--gpt2_preset tiny --llama_preset llama-tiny --layers 1 --V 32 --prompt 4 --new 2)
    else
        SIMFLAG=
        TESTS=(tests/cuda --deselect tests/cuda/test_ptx.py)
        KERNELS=(--B 8 --T 1024)
        TRAIN=()
        DECODE=()
    fi

    stage discover 45 $PY $G/discover.py --out "$WORK/discover.json" $SIMFLAG
    command -v nvidia-smi > /dev/null && stage nvidia_smi 15 nvidia-smi \
        --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    # the CPU references of the train and decode stages compile their Numba kernels cold (fresh
    # cache): do that on the idle CPU cores while the test stage runs
    timeout $((300 * SCALE)) $PY $G/warm_cpu.py --out "$WORK/warm_cpu.json" $SIMFLAG > "$WORK/warm_cpu.log" 2>&1 &
    WARM_PID=$!
    TIMEOUT_OPT=()
    $PY -c "import pytest_timeout" 2> /dev/null && TIMEOUT_OPT=(--timeout 120)
    stage tests 210 $PY -m pytest -v -m "not slow" -p no:cacheprovider "${TIMEOUT_OPT[@]}" \
        --junitxml="$WORK/tests.xml" "${TESTS[@]}"
    stage resources 60 $PY $G/resources.py --out "$WORK/resources.json" $SIMFLAG
    stage kernels 60 $PY $G/kernels.py --out "$WORK/kernels.json" $SIMFLAG "${KERNELS[@]}"
    stage train 120 $PY $G/train.py --out "$WORK/train.json" $SIMFLAG "${TRAIN[@]}"
    if [ "$SIM" = 1 ]; then
        printf 'speed\t-1\t0\tskipped: simulator\n' >> "$WORK/stages.tsv"
    else   # each framework in its own process (its own CUDA context and peak memory)
        stage speed 150 $PY benchmarks/bench_train_cuda.py --configs d12:8:1024 --frameworks nt-bf16 nt torch \
            --steps 5 --warmup 2 --timeout 60 --out "$WORK/speed.json"
    fi
    stage decode 90 $PY $G/decode.py --out "$WORK/decode.json" $SIMFLAG "${DECODE[@]}"
    if [ "$SIM" = 1 ]; then
        printf 'sanitizer\t-1\t0\tskipped: simulator\n' >> "$WORK/stages.tsv"
    elif command -v compute-sanitizer > /dev/null; then
        for tool in memcheck racecheck; do
            stage "sanitizer_$tool" 60 compute-sanitizer --tool $tool --error-exitcode 3 $PY $G/tiny_step.py --out "$WORK/tiny_step.json"
        done
    else
        printf 'sanitizer\t-1\t0\tskipped: compute-sanitizer not found\n' >> "$WORK/stages.tsv"
    fi

    wait $WARM_PID   # long done (or killed by its timeout) on any run that got this far
    printf 'warm_cpu\t%d\t0\t%s\n' $? "background CPU compile (exit code 0: done)" >> "$WORK/stages.tsv"
    $PY $G/merge.py --work "$WORK" --out "$OUT_JSON" --started "$START" --simulate "$SIM" \
        --commit "$(git rev-parse HEAD 2> /dev/null || echo unknown)"
}

main "$@"
