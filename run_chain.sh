#!/usr/bin/env bash
# The whole offline pipeline on a laptop CPU: data -> pre-training -> SFT -> DPO -> GRPO -> a sampled answer,
# in under 20 minutes on 2 cores, printing each stage's number as it ends, and a report at the end
# ($OUT/report.md, report.json, report.png: python report.py --out_dir=$OUT makes it again from the run dirs):
#   pre-training: held-out val loss            SFT: arithmetic answer accuracy (greedy, exact match)
#   DPO: held-out preference accuracy, and the answer accuracy of its model (GRPO's step-0 evaluation)
#   GRPO: sampled accuracy (the share of right samples at the rollout temperature), greedy accuracy and the
#         held-out mean reward, at its start and its end
#
#   bash run_chain.sh                                 # data under data/, checkpoints under out/
#   OUT=/tmp/chain DATA=/tmp/data bash run_chain.sh   # elsewhere
#   bash run_chain.sh --device=cpu                    # --key=value arguments go to every training stage;
#   GRPO_ARGS="--max_steps=10" bash run_chain.sh      # PT_ARGS, SFT_ARGS, DPO_ARGS, GRPO_ARGS to one of them
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-out}
DATA=${DATA:-data}
SUMMARY=()
TIMES=()
START=$SECONDS

stage() {  # stage <name> <command...>: run it, and remember how long it took
    local name=$1 begin=$SECONDS
    shift
    echo "== $name: $*"
    "$@"
    SUMMARY+=("$(printf '%-13s %4ds' "$name" $((SECONDS - begin)))")
    TIMES+=("\"$name\": $((SECONDS - begin))")
}

metric() {  # metric <stage> <log.jsonl> <first|last> <keys...>: print (and remember) an evaluation record
    local line
    line=$(python - "$@" <<'EOF'
import json, sys
stage, path, which, keys = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
records = [r for r in map(json.loads, open(path)) if all(k in r for k in keys)]
if not records:
    sys.exit(f"error: {path} holds no record with {', '.join(keys)}")
record = records[0 if which == "first" else -1]
print(f"{stage} (step {record['step']}): " + " | ".join(f"{k} {record[k]:.4f}" for k in keys))
EOF
)
    echo "== $line"
    SUMMARY[-1]+="   $line"
}

stage prepare python prepare_data.py --out_dir="$DATA"
stage pretrain python train_pt.py config/doge_tiny.py --data_dir="$DATA/shakespeare" --out_dir="$OUT/pt" "$@" ${PT_ARGS:-}
metric "val loss" "$OUT/pt/log.jsonl" last val_loss
stage sft python train_sft.py config/sft_tiny.py --data_dir="$DATA/arithmetic" --init_from="$OUT/pt" --out_dir="$OUT/sft" "$@" ${SFT_ARGS:-}
metric "after SFT" "$OUT/sft/log.jsonl" last accuracy
stage dpo python train_dpo.py config/dpo_tiny.py --data_dir="$DATA/arithmetic" --init_from="$OUT/sft" --out_dir="$OUT/dpo" "$@" ${DPO_ARGS:-}
metric "after DPO" "$OUT/dpo/log.jsonl" last val_rewards/accuracies
stage grpo python train_grpo.py config/grpo_tiny.py --data_dir="$DATA/arithmetic" --init_from="$OUT/dpo" --out_dir="$OUT/grpo" "$@" ${GRPO_ARGS:-}
metric "after DPO" "$OUT/grpo/log.jsonl" first sampled_accuracy accuracy reward
metric "after GRPO" "$OUT/grpo/log.jsonl" last sampled_accuracy accuracy reward
stage sample bash -c "echo 'What is 27 + 58?' | python sample.py --init_from='$OUT/grpo' --chat --temperature=0"

echo
echo "== the chain in $((SECONDS - START)) s"
printf '%s\n' "${SUMMARY[@]}"
echo "{$(IFS=,; echo "${TIMES[*]}"), \"total\": $((SECONDS - START))}" > "$OUT/seconds.json"
python report.py --out_dir="$OUT"
