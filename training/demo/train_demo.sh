#!/usr/bin/env bash
# Rebuilds the embedded demo models from nothing but this repository and the Python interpreter:
#   models/demo         tiny Nemotron (4 layers, hidden 192, vocab 4096): pretrained on CPython's docs, then SFT
#   models/demo-reward  tiny reward model (Nemotron-4-340B-Reward layout) on synthetic HelpSteer2-format rows
# On the 2-core CPU of our dev machines the whole run takes about 45 minutes. Usage:
#   bash training/demo/train_demo.sh [WORK_DIR]        (default /tmp/n4-demo)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TRAIN=${TRAIN:-.venv/bin/n4-train}
WORK=${1:-/tmp/n4-demo}
DATA=$WORK/data
mkdir -p "$DATA"

# 1. Data (deterministic; a few seconds each).
$PY training/demo/build_corpus.py --output-dir "$DATA/corpus"
$PY training/demo/build_chat_set.py --output "$DATA/chat_train.jsonl" --heldout "$DATA/chat_heldout.jsonl"
$PY training/demo/build_reward_set.py --chat "$DATA/chat_train.jsonl" --output "$DATA/reward_train.jsonl"
$PY training/demo/build_reward_set.py --chat "$DATA/chat_heldout.jsonl" --output "$DATA/reward_heldout.jsonl"

# 2. Pretraining from scratch: ~700k tokens, ~7 epochs of packed 256-token rows. A 2400-step run stopped
#    improving on held-out text at ~1200 steps (perplexity 25.8, then rising: 3M parameters overfit 700k tokens).
$TRAIN pretrain --model models/demo/config.json --tokenizer models/demo \
    --data "$DATA/corpus/train.txt" --eval-data "$DATA/corpus/heldout.txt" --output "$WORK/pretrained" \
    --seq-len 256 --batch-size 16 --max-steps 1300 --lr 3e-3 --warmup-steps 100 --weight-decay 0.1 \
    --eval-every 200 --save-every 400 --seed 0 --resume

# 3. SFT on the chat set (5.4k conversations packed into 952 rows of 512; 213k assistant tokens): 4 epochs,
#    loss on assistant turns only.
$TRAIN sft --model "$WORK/pretrained" --data "$DATA/chat_train.jsonl" --eval-data "$DATA/chat_heldout.jsonl" \
    --output "$WORK/sft" --seq-len 512 --batch-size 16 --max-steps 240 --lr 1e-3 --warmup-steps 20 \
    --eval-every 40 --save-every 80 --seed 0 --resume

# 4. Reward model from the pretrained backbone with a fresh 9-output head (15.7k rows, ~1.2 epochs).
$TRAIN rm --model "$WORK/pretrained" --data "$DATA/reward_train.jsonl" --eval-data "$DATA/reward_heldout.jsonl" \
    --output "$WORK/reward" --seq-len 512 --batch-size 32 --max-steps 600 --lr 1e-3 --warmup-steps 30 \
    --eval-every 200 --save-every 200 --seed 0 --resume

# 5. Install as the embedded demo models (bf16 weights, config, tokenizer) and plot the loss curves.
for pair in "sft:models/demo" "reward:models/demo-reward"; do
    src=$WORK/${pair%%:*}; dst=${pair#*:}
    mkdir -p "$dst"
    for f in config.json model.safetensors tokenizer.model tokenizer.json tokenizer_config.json \
             special_tokens_map.json training_summary.json; do
        cp "$src/$f" "$dst/$f"
    done
done
$PY training/demo/plot_loss.py --run "pretrain=$WORK/pretrained" --run "sft=$WORK/sft" \
    --baseline "$($PY -c 'import math; print(math.log(4096))')" --output models/demo/loss.png
