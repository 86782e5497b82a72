#!/usr/bin/env bash
# Everything that needs a GPU, in one run of about 10 minutes on one GPU, into one report:
#   1. bench/gpu_steps.py: train_f30k.py runs on CUDA in bf16 (BERT) and in fp16 with the
#      GradScaler (Bi-GRU), each resumed from its checkpoint, and one training step of the
#      Bi-GRU and of the BERT model under torch.cuda.set_sync_debug_mode("error"),
#   2. the CUDA-only tests (pytest -k cuda: the tests parametrised over the cuda device),
#   3. bench/bench_throughput.py --gpu: the default CODER model with a BERT-base-sized text
#      encoder at batch 128, bf16 and fp32, projected to one Flickr30K epoch (145,000 captions;
#      target at most 45 s on an H100/H200), then a short real train_f30k.py run on the GPU,
#   4. as much of the Flickr8k table with 3 seeds as the remaining budget allows
#      (bench/bench_flickr8k.py --device cuda; finished runs are cached, so a second call
#      continues where the budget stopped the first).
# Writes OUT/gpu_check.md (and each step's full output under OUT/logs/).
#
#   bash bench/gpu_check.sh --out DIR [--budget_minutes 10] [--flickr8k DIR] [--skip-steps]
#                           [--skip-tests] [--skip-throughput] [--skip-flickr8k] [--dry-run]
#
# --dry-run runs nothing and needs no GPU: it writes the report with the commands it would run.
# Exit status 1 when a step failed (a step stopped at its time limit is no failure), 2 for bad
# arguments or a machine without CUDA.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
fail() { echo "error: gpu_check.sh: $*" >&2; exit 2; }
# needs_value OPTION WHAT ARGS...: the option is followed by a value, not by the next option
needs_value() { (($# > 3)) && [[ "$4" != --* ]] || fail "$1 needs $2"; }

OUT="" BUDGET=10 FLICKR8K="$ROOT/data/flickr8k" DRY=0
SKIP_STEPS=0 SKIP_TESTS=0 SKIP_THROUGHPUT=0 SKIP_FLICKR8K=0
while (($#)); do
  case "$1" in
    "--out") needs_value "$1" "a folder" "$@"; OUT="$2"; shift 2 ;;
    "--budget_minutes") needs_value "$1" "a number" "$@"; BUDGET="$2"; shift 2 ;;
    "--flickr8k") needs_value "$1" "a folder" "$@"; FLICKR8K="$2"; shift 2 ;;
    "--skip-steps") SKIP_STEPS=1; shift ;;
    "--skip-tests") SKIP_TESTS=1; shift ;;
    "--skip-throughput") SKIP_THROUGHPUT=1; shift ;;
    "--skip-flickr8k") SKIP_FLICKR8K=1; shift ;;
    "--dry-run") DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$OUT" ]] || fail "--out DIR is required (the folder for gpu_check.md)"
[[ "$BUDGET" =~ ^[0-9]+$ ]] && ((BUDGET >= 3)) || fail "--budget_minutes $BUDGET: must be a whole number of at least 3"
[[ ! -e "$OUT" || -d "$OUT" ]] || fail "--out $OUT: is a file, not a folder"
if ((!DRY)); then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || fail "no CUDA GPU visible to torch on this machine (this script checks the GPU paths; --dry-run shows its plan)"
fi
mkdir -p "$OUT/logs" 2>/dev/null && [[ -w "$OUT" ]] || fail "--out $OUT: cannot write there"
export PYTHONUNBUFFERED=1  # a step stopped at its limit keeps its last lines in the log

REPORT="$OUT/gpu_check.md"
ROWS=()      # one markdown table row per step
FAILED=0
SECTIONS=()  # one markdown section per step (output tail)
DEADLINE=$((SECONDS + BUDGET * 60))

# run_step NAME LIMIT_SECONDS COMMAND...: run it (or, in a dry run, only note it) under a time
# limit, its output in OUT/logs/NAME.log; adds the step's row and output tail to the report.
run_step() {
  local name="$1" limit="$2" status code start log="$OUT/logs/$1.log"
  shift 2
  start=$SECONDS
  if ((DRY)); then
    echo "$*" >"$log"
    status="dry run: not run"
  else
    echo "== $name (at most ${limit} s): $*" >&2
    (cd "$ROOT" && timeout --kill-after=20 "$limit" "$@") >"$log" 2>&1
    code=$?
    case $code in
      0) status="passed" ;;
      124|137) status="stopped at its time limit (${limit} s)" ;;
      *) status="FAILED (exit $code)"; FAILED=1 ;;
    esac
  fi
  ROWS+=("| $name | $status | $((SECONDS - start)) | \`$*\` |")
  SECTIONS+=("### $name"$'\n\n'"Last lines of \`logs/$name.log\`:"$'\n\n```\n'"$(tail -n 40 "$log")"$'\n```\n')
}

skip_step() { ROWS+=("| $1 | skipped ($2) | 0 | |"); }

left() { echo $((DEADLINE - SECONDS)); }
# capped N: N seconds, or what is left of the budget where that is less (at least 1)
capped() { local l; l=$(left); echo $(($1 < l ? $1 : (l > 1 ? l : 1))); }

if ((SKIP_STEPS)); then skip_step cuda_steps "--skip-steps"
else run_step cuda_steps "$(capped 240)" "$PYTHON" bench/gpu_steps.py --device cuda
fi
if ((SKIP_TESTS)); then skip_step cuda_tests "--skip-tests"
else run_step cuda_tests "$(capped 150)" "$PYTHON" -m pytest -q -rs tests -k cuda
fi
if ((SKIP_THROUGHPUT)); then skip_step throughput "--skip-throughput"
else run_step throughput "$(capped 240)" "$PYTHON" bench/bench_throughput.py --gpu
fi
if ((SKIP_FLICKR8K)); then skip_step flickr8k "--skip-flickr8k"
elif [[ ! -d "$FLICKR8K" ]]; then skip_step flickr8k "no Flickr8k folder at $FLICKR8K; pass --flickr8k DIR"
elif (($(left) < 120)); then skip_step flickr8k "under 2 minutes of the budget left"
else
  run_step flickr8k $(($(left) - 45)) "$PYTHON" bench/bench_flickr8k.py --device cuda --seeds 3 \
    --data "$FLICKR8K" --out "$OUT/flickr8k"
  if ((!DRY)); then  # the table of the runs that finished within the budget
    (cd "$ROOT" && "$PYTHON" bench/bench_flickr8k.py --device cuda --seeds 3 --out "$OUT/flickr8k" --report) \
      >"$OUT/logs/flickr8k_report.log" 2>&1
  fi
fi

{
  echo "# GPU check"
  echo
  dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ", with uncommitted changes")
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$dirty."
  if ((DRY)); then echo "Dry run: nothing was run."
  else echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  fi
  echo "Budget: $BUDGET minutes; took $((SECONDS / 60)) min $((SECONDS % 60)) s."
  echo
  echo "| step | status | seconds | command |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [[ -s "$OUT/logs/cuda_steps.log" ]] && ((!DRY)); then
    echo "## CUDA steps (bf16; fp16 with the GradScaler; resume; a step without waits for the device)"
    echo
    "$PYTHON" - "$OUT/logs/cuda_steps.log" <<'EOF'
import json, sys
print("| check | result | seconds | detail |")
print("|---|---|---|---|")
for line in open(sys.argv[1]):
    try:
        rec = json.loads(line)
    except ValueError:
        continue
    if "check" in rec:
        detail = rec.get("error") or rec.get("stderr_tail", "")[-300:] or rec.get("sync_debug_mode", "")
        if rec.get("where"):
            detail += " (at " + " < ".join(reversed(rec["where"])) + ")"
        detail = " ".join(detail.split()).replace("|", "/")
        print(f"| {rec['check']} | {'passed' if rec.get('ok') else 'FAILED'} | {rec.get('seconds')} | {detail} |")
EOF
    echo
  fi
  if [[ -s "$OUT/logs/throughput.log" ]] && ((!DRY)); then
    echo "## Throughput (Flickr30K epoch target: at most 45 s on an H100/H200)"
    echo
    "$PYTHON" - "$OUT/logs/throughput.log" <<'EOF'
import json, sys
print("| precision | TF32 | captions/s | s/step | one Flickr30K epoch | peak memory (GiB) |")
print("|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    try:
        rec = json.loads(line)
    except ValueError:
        continue
    if rec.get("bench") == "throughput" and "captions_per_s" in rec:
        print(f"| {rec['precision']} | {rec.get('tf32')} | {rec['captions_per_s']} | {rec['step_s']} | "
              f"{rec['f30k_epoch_min'] * 60:.0f} s | {rec.get('peak_mem_gib')} |")
EOF
    echo
  fi
  if [[ -s "$OUT/flickr8k/results.md" ]]; then
    echo "## Flickr8k (the runs that finished within the budget)"
    echo
    cat "$OUT/flickr8k/results.md"
    echo
  fi
  echo "## Output of each step"
  echo
  printf '%s\n' "${SECTIONS[@]}"
} >"$REPORT"
echo "report: $REPORT" >&2
exit $FAILED
