#!/usr/bin/env bash
# Training throughput and peak memory on this machine's GPUs, with and without the rank loss.
#
# Trains MODEL (default ViT-B/32) for STEPS optimizer steps per objective on synthetic
# image-caption data (utils/make_demo.py pictures, listed repeatedly so that an epoch is
# STEPS/2 steps), through torchrun on all visible GPUs, then prints one table row per
# objective from the second (timed) epoch: samples/s per GPU and overall, and the peak GPU
# memory of one process. The first epoch absorbs start-up costs (cuDNN autotuning, compile).
#
#   bash utils/gpu_check.sh                              # all GPUs, ViT-B/32, 256 per GPU
#   GPUS=1 BATCH_PER_GPU=512 EXTRA="--grad_checkpointing" bash utils/gpu_check.sh
#   DEVICE=cpu GPUS=1 MODEL=tiny-vit BATCH_PER_GPU=16 STEPS=4 bash utils/gpu_check.sh   # smoke run
#
# Settings (environment): GPUS, MODEL, BATCH_PER_GPU, STEPS, LOSSES ("clip rankclip"),
# PRECISION (amp), WORKERS (data workers per process, 6), EXTRA (more rankclip.main flags),
# DEVICE (gpu; cpu for a smoke run), WORK (folder for data and runs; a temporary one by default).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=${DEVICE:-gpu}
if [[ $DEVICE == gpu ]]; then
    VISIBLE=$(python -c "import torch; print(torch.cuda.device_count())")
    if [[ $VISIBLE == 0 ]]; then
        echo "gpu_check: no CUDA GPU is visible; for a CPU smoke run set DEVICE=cpu GPUS=1 MODEL=tiny-vit" >&2
        exit 2
    fi
    GPUS=${GPUS:-$VISIBLE}
else
    GPUS=${GPUS:-1}
fi
MODEL=${MODEL:-ViT-B/32}
BATCH_PER_GPU=${BATCH_PER_GPU:-256}
STEPS=${STEPS:-200}
LOSSES=${LOSSES:-clip rankclip}
PRECISION=${PRECISION:-amp}
WORKERS=${WORKERS:-6}
EXTRA=${EXTRA:-}
WORK=${WORK:-$(mktemp -d -t rankclip-gpu-check-XXXXXX)}
if (( STEPS < 2 || STEPS % 2 )); then
    echo "gpu_check: STEPS must be an even number of at least 2, got $STEPS" >&2
    exit 2
fi

GLOBAL_BATCH=$((BATCH_PER_GPU * GPUS))
SAMPLES=$((GLOBAL_BATCH * STEPS / 2))
echo "gpu_check: $GPUS x $DEVICE, $MODEL, global batch $GLOBAL_BATCH, $STEPS steps per objective, work folder $WORK"

# Synthetic data: 2048 distinct pictures, listed until one epoch holds STEPS/2 global batches.
python "$REPO/utils/make_demo.py" --out "$WORK/data" --num_train 2048 --num_val 1 --num_eval 16 > /dev/null
python - "$WORK/data" "$SAMPLES" <<'PY'
import csv, itertools, sys
from pathlib import Path
folder, samples = Path(sys.argv[1]), int(sys.argv[2])
with open(folder / "train.csv", newline="") as f:
    header, *rows = list(csv.reader(f))
with open(folder / "repeated.csv", "w", newline="") as f:
    csv.writer(f).writerows([header, *itertools.islice(itertools.cycle(rows), samples)])
PY

for LOSS in $LOSSES; do
    # shellcheck disable=SC2086  # EXTRA holds several flags
    python -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m rankclip.main \
        --train_data "$WORK/data/repeated.csv" --model_name "$MODEL" --loss "$LOSS" \
        --batch_size "$GLOBAL_BATCH" --epochs 2 --num_warmup_steps 10 --precision "$PRECISION" \
        --num_workers "$WORKERS" --device "$DEVICE" --logs_dir "$WORK/logs" --name "$LOSS" $EXTRA \
        > "$WORK/$LOSS.log" 2>&1 || { echo "gpu_check: the $LOSS run failed; see $WORK/$LOSS.log" >&2; exit 1; }
done

python - "$WORK/logs" "$GPUS" "$BATCH_PER_GPU" "$MODEL" "$PRECISION" "$EXTRA" $LOSSES <<'PY'
import json, sys
from pathlib import Path
logs, gpus, per_gpu, model, precision, extra, *losses = sys.argv[1:]
print(f"\n{model}, {gpus} process(es) x batch {per_gpu}, {precision} {extra}".rstrip())
print("| loss | samples/s per process | samples/s overall | peak memory per process (GiB) |")
print("| --- | --- | --- | --- |")
for loss in losses:
    records = [json.loads(line) for line in (Path(logs) / loss / "results.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["split"] == "train"][-1]
    memory = timed.get("peak_memory_gib")
    print(f"| {loss} | {timed['samples_per_second_per_process']:.0f} | {timed['samples_per_second']:.0f} | "
          f"{'-' if memory is None else f'{memory:.2f}'} |")
PY
