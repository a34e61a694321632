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
# Then it runs `utils/bench_train.py` on one GPU: open_clip_train against this trainer
# (--loss clip and --loss rankclip) on the same generated data, BENCH_MODEL (default ViT-B-32),
# batch BATCH_PER_GPU, PRECISION and WORKERS, BENCH_PAIRS rounds of BENCH_STEPS steps each, and
# the evaluation time with 1 process (and 2 when two GPUs are visible); it prints its table last.
# Both parts together take about 6 minutes on one GPU with the defaults.
#
# Settings (environment): GPUS, MODEL, BATCH_PER_GPU, STEPS, LOSSES ("clip rankclip"),
# PRECISION (amp), WORKERS (data workers per process, 6), EXTRA (more rankclip.main flags),
# DEVICE (gpu; cpu for a smoke run), WORK (folder for data and runs; a temporary one by default),
# BENCH_MODEL, BENCH_STEPS (60), BENCH_PAIRS (2; 0 skips the comparison).
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
BENCH_MODEL=${BENCH_MODEL:-ViT-B-32}
BENCH_STEPS=${BENCH_STEPS:-60}
BENCH_PAIRS=${BENCH_PAIRS:-2}
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

if (( BENCH_PAIRS > 0 )); then
    EVAL_PROCESSES="1"
    if (( GPUS >= 2 )); then EVAL_PROCESSES="1 2"; fi
    echo
    # shellcheck disable=SC2086  # EVAL_PROCESSES holds several counts
    python "$REPO/utils/bench_train.py" --model "$BENCH_MODEL" --device "$([[ $DEVICE == gpu ]] && echo cuda || echo cpu)" \
        --precision "$PRECISION" --batch_size "$BATCH_PER_GPU" --workers "$WORKERS" \
        --images $((BATCH_PER_GPU * BENCH_STEPS)) --pairs "$BENCH_PAIRS" --skip $((BENCH_STEPS / 6)) \
        --log_every $(( BENCH_STEPS >= 20 ? 5 : 1 )) --eval_processes $EVAL_PROCESSES \
        || { echo "gpu_check: the open_clip_train comparison failed" >&2; exit 1; }
fi
