#!/usr/bin/env bash
# Every CUDA row of the benchmarks in one go, most wanted first, each step under its own
# time limit, so that a GPU lent for a few minutes gives what it can. Run from the repo
# root with the package importable (pip install -e ., or PYTHONPATH=src):
#
#     bash bench/gpu_rows.sh OUT_DIR
#
# Writes each step's log and JSON under OUT_DIR/rows/, and after every step bundles them
# into OUT_DIR/gpu-rows.tgz (what is there when time runs out is what came back).
set -u
out=${1:?usage: bash bench/gpu_rows.sh OUT_DIR}
rows="$out/rows"
mkdir -p "$rows"
amp=(--device "${DEVICE:-cuda}" --amp bf16)  # DEVICE=cpu: a dry run of the commands

step() {  # step NAME SECONDS COMMAND...: run it, log it, bundle everything so far
    local name=$1 limit=$2 began=$SECONDS
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="a b": those
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$rows/$name.log" 2>&1
    echo "-- $name: exit $? after $((SECONDS - began))s"
    tail -n 25 "$rows/$name.log"
    tar czf "$out/gpu-rows.tgz" -C "$out" rows
}

step machine 30 bash -c 'nvidia-smi; python3 -c "import torch; print(torch.__version__,
    torch.cuda.get_device_name())"'
step cuda-tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_bank.py tests/test_bits.py \
    tests/test_functional.py tests/test_resident_norms.py tests/test_host_syncs.py
# issue 18: switch, re-derived forward, mixed batches, resident tasks (batch 64)
step speed-b64 240 python3 bench/speed.py "${amp[@]}" --batch 64 --repeat 15 \
    --parts inference tasks --models resnet50 efficientnet_lite0 \
    --resident-models efficientnet_lite0 --out "$rows/speed-cuda-b64.json"
step profile-forward-resnet50 60 python3 bench/profile_forward.py "${amp[@]}" --batch 64 \
    --model resnet50 --out "$rows/profile_forward-cuda-resnet50.json"
step profile-load-resnet50 60 python3 bench/profile_load.py --device "${DEVICE:-cuda}" --model resnet50 \
    --out "$rows/profile_load-cuda-resnet50.json"
step profile-forward-lite0 60 python3 bench/profile_forward.py "${amp[@]}" --batch 64 \
    --model efficientnet_lite0 --out "$rows/profile_forward-cuda-lite0.json"
# issue 17: the mask step against a fine-tuning step
step speed-training 150 python3 bench/speed.py "${amp[@]}" --batch 64 --repeat 15 \
    --parts training --out "$rows/speed-cuda-training.json"
step profile-step-resnet50 60 python3 bench/profile_step.py "${amp[@]}" --batch 64 \
    --model resnet50 --steps 5 --trace "$rows/trace-resnet50" \
    --out "$rows/profile_step-cuda-resnet50.json"
step profile-step-lite0 60 python3 bench/profile_step.py "${amp[@]}" --batch 64 \
    --model efficientnet_lite0 --steps 5 --trace "$rows/trace-lite0" \
    --out "$rows/profile_step-cuda-lite0.json"
# issue 17: whole runs, where their time goes, and the loaders' data wait
step train-cost 200 python3 bench/train_cost.py "${amp[@]}" --size 224 --limit 2000 \
    --epochs 3 --methods piggyback finetune --out "$rows/train_cost-cuda.json"
step data-wait 200 python3 bench/train_cost.py "${amp[@]}" --size 224 --limit 2000 \
    --epochs 3 --methods piggyback --loaders per-item default \
    --out "$rows/train_cost-cuda-loaders.json"
# issue 18: mixed batches at batch 16; the server on the GPU
step speed-b16 120 python3 bench/speed.py "${amp[@]}" --batch 16 --repeat 15 --parts tasks \
    --models resnet50 efficientnet_lite0 --resident-models --out "$rows/speed-cuda-b16.json"
step serve 180 python3 bench/serve.py "${amp[@]}" --out "$rows/serve-cuda.json"
# issue 19: task inference over k tasks against one forward
step task-inference 120 python3 bench/task_inference.py "${amp[@]}" --size 224 --cost-only \
    --out "$rows/task-inference-cost-cuda.json"
