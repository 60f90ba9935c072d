#!/usr/bin/env bash
# Training experiments on a lent GPU: each line of a runs file is "NAME train.py-flags"; every run
# trains in parallel on the one GPU (--device cuda) within MINUTES, then scores the held-out set on
# the reference path (EVAL per task). The summary table is printed last and saved as $OUT/sweep.json.
# The shipped checkpoint is trained on CPU (`make train`): a sweep only picks what to train there.
# Usage (repo root): MINUTES=8 EVAL=50 bash training/gpu_sweep.sh training/sweep_runs.txt
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sweep_out}
WORK=${WORK:-/tmp/sweep}
MINUTES=${MINUTES:-8}
EVAL=${EVAL:-50}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
pids=()
while read -r name flags; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    # shellcheck disable=SC2086
    ${PY:-python3} -m training.train --out "$WORK/$name" --device "${DEVICE:-cuda}" --threads 1 --minutes "$MINUTES" \
        --eval-per-task "$EVAL" $flags > "$WORK/$name.log" 2>&1 &
    pids+=($!)
done < "$1"
for pid in "${pids[@]}"; do wait "$pid"; done
${PY:-python3} - "$WORK" "$OUT/sweep.json" <<'PY'
import json, sys
from pathlib import Path
work, rows = Path(sys.argv[1]), {}
for log in sorted(work.glob("*/training_log.json")):
    rows[log.parent.name] = json.loads(log.read_text())
for log in sorted(work.glob("*.log")):
    if log.stem not in rows:
        print(f"{log.stem}: FAILED\n" + "\n".join(log.read_text().splitlines()[-8:]))
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
print(f"{'run':<14} {'steps':>6} {'min':>5} {'loss':>6} {'aux':>6} {'subj':>6} {'caption':>8} {'vqa':>6} {'ground':>7}")
for name, r in rows.items():
    e = r.get("held_out_reference", {})
    print(f"{name:<14} {r['steps']:>6} {r['minutes']:>5.1f} {r['final_loss']:>6.3f} {r['final_aux_loss']:>6.3f} "
          f"{r.get('final_subject_loss', 0):>6.3f} "
          f"{e.get('caption', 0):>8.0%} {e.get('vqa', 0):>6.0%} {e.get('grounding', 0):>7.0%}")
PY
