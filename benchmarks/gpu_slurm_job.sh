#!/bin/bash
# A 1-GPU training job through the command experiments.slurm.submit renders, without sbatch or srun,
# in a simulated SLURM environment: the first start gets SIGUSR1 (what --signal=SIGUSR1@90 sends),
# saves last.ckpt and "requeues" itself (scontrol is faked and records the call); the second start is
# the requeued job, runs the same command, resumes and finishes with the test stage.
#
#   bash benchmarks/gpu_slurm_job.sh OUT [CONFIG]   # defaults: experiments/configs/paper.yaml
#
# Environment: GRID (200,192,192), TRAIN (512), EPOCHS (3), SIGNAL_AFTER_S (10), WORKERS (15),
# DATA (/tmp/gpu_job_data), RUN (the run directory, /tmp/gpu_job_run), EXTRA (more key=value overrides).
# OUT gets the job script, both starts' logs, the scontrol calls, the run's config, metrics and
# per-attempt records, and summary.txt (also printed line by line as the job goes).
# No NME (nme.every_n_epochs=0): the GPU machine has no Open3D; score the checkpoint on a CPU.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: gpu_slurm_job.sh OUT [CONFIG]}")
CONFIG=${2:-experiments/configs/paper.yaml}
GRID=${GRID:-200,192,192}
DATA=${DATA:-/tmp/gpu_job_data}
RUN=${RUN:-/tmp/gpu_job_run}
rm -rf "$RUN"
mkdir -p "$OUT/bin"
cd "$(dirname "$0")/.."

start=$SECONDS
python -m data_prep.synthetic --out "$DATA" --split train="${TRAIN:-512}" --split val=16 --split test=16 \
    --grid "$GRID" --workers "${WORKERS:-15}" > "$OUT/data.log" 2>&1
echo "data: $((SECONDS - start)) s" | tee "$OUT/summary.txt"

python -m experiments.slurm.submit --config "$CONFIG" --dry-run --time 00:30:00 "data.dir=$DATA" "grid=$GRID" \
    nme.every_n_epochs=0 "trainer.max_epochs=${EPOCHS:-3}" trainer.enable_progress_bar=false \
    checkpoint.every_n_train_steps=50 ${EXTRA:-} "run_dir=$RUN" > "$OUT/job.sbatch"
command=$(grep '^srun ' "$OUT/job.sbatch")
command=${command#srun }
echo "command: $command" | tee -a "$OUT/summary.txt"

printf '#!/bin/sh\necho "$@" >> %s\n' "$OUT/scontrol.calls" > "$OUT/bin/scontrol"
chmod +x "$OUT/bin/scontrol"
export PATH="$OUT/bin:$PATH" SLURM_JOB_ID=4242 SLURM_NTASKS=1 SLURM_JOB_NAME=vrn-gpu-job SLURM_NODELIST=localhost \
    SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0

start=$SECONDS
bash -c "exec $command" > "$OUT/start1.log" 2>&1 &  # exec: the signal reaches python, as srun passes it on
job=$!
while [ ! -f "$RUN/checkpoints/last.ckpt" ] && kill -0 $job 2>/dev/null; do sleep 1; done
sleep "${SIGNAL_AFTER_S:-10}"
kill -USR1 $job 2>/dev/null || true
set +e
wait $job
rc1=$?
set -e
echo "start 1: exit $rc1 after $((SECONDS - start)) s; scontrol calls: $(cat "$OUT/scontrol.calls" 2>/dev/null)" | tee -a "$OUT/summary.txt"
python - "$RUN/checkpoints/last.ckpt" <<'EOF' | tee -a "$OUT/summary.txt"
import sys, torch
c = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(f"last.ckpt after start 1: epoch {c['epoch']}, global_step {c['global_step']}")
EOF

start=$SECONDS
export SLURM_RESTART_COUNT=1
bash -c "$command" > "$OUT/start2.log" 2>&1
echo "start 2 (the requeued job): exit 0 after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
python - "$RUN" <<'EOF' | tee -a "$OUT/summary.txt"
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
metrics = json.loads((run / "metrics.json").read_text())
print("metrics.json:", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, str)}, sort_keys=True))
for log in sorted(run.glob("csv/version_*/metrics.csv")):
    rows = list(csv.DictReader(log.open()))
    steps = [int(r["step"]) for r in rows if r.get("step")]
    epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("epoch")})
    print(f"{log.parent.name}: steps {min(steps)}-{max(steps)}, epochs {epochs}")
print("attempts:", sorted(p.name for p in (run / "attempts").iterdir()))
EOF
cp "$RUN/config.yaml" "$RUN/command.txt" "$RUN/metrics.json" "$OUT/"
for log in "$RUN"/csv/version_*/metrics.csv; do cp "$log" "$OUT/metrics-$(basename "$(dirname "$log")").csv"; done
