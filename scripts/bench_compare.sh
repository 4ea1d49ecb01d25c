#!/usr/bin/env bash
# Side-by-side CPU throughput: our bench and PyTorch on the same shapes, one process each
# (so peak RSS is per shape), alternating, in one session. Prints the ratios.
#   scripts/bench_compare.sh [SHAPE...]      (default: all shapes)
# PYTHON=/path/to/python (default /tmp/torchvenv/bin/python), MODE bits: 1 train, 2 greedy
# generation, 8 sampled generation (default 3; 11 for all three),
# REPS=N (default 1): N alternations per shape; the table then shows medians of each side.
# MATMUL=bf16: ours with BF16 matmuls on AMX or AVX512-BF16 (RLHF_MATMUL=bf16) against PyTorch under
# torch.autocast(bfloat16) (AUTOCAST=bf16); generation is f32 on both sides either way.
# LORA=r: LoRA training on both sides (rank r on every block linear, dropout 0.05, base frozen;
# RLHF_BENCH_LORA=r and the script's LORA=r).
# GEN_ROWS=n: decode n sequences together (default 8; PPO decodes its rollout batch, 64 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/tmp/torchvenv/bin/python}
MODE=${MODE:-3}
REPS=${REPS:-1}
SHAPES=${*:-gpt2-v50k gpt2-v8k gpt2-d512 llama-d256 llama-d512}
cargo bench -q -p rlhf-model --bench speed --no-run 2>/dev/null
BIN=$(cargo bench -p rlhf-model --bench speed --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)
field() { sed -n "s|.*RESULT $1 .*$2=\([0-9.]*\).*|\1|p" | tail -1; }
rss() { sed -n 's/.*peak_rss_MB=\([0-9]*\).*/\1/p' | tail -1; }
median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -n | awk '{v[NR]=$1} END {if (NR) print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
if [ -n "${LORA:-}" ]; then export RLHF_BENCH_LORA=$LORA LORA; fi
if [ -n "${GEN_ROWS:-}" ]; then export RLHF_BENCH_GEN_ROWS=$GEN_ROWS GEN_ROWS; fi
echo "machine: $(lscpu | sed -n 's/Model name: *//p'), $(nproc) cpus; load: $(cut -d' ' -f1-3 /proc/loadavg); reps: $REPS; matmul: ${MATMUL:-f32}; lora: ${LORA:-none}; gen rows: ${GEN_ROWS:-8}"
printf "%-11s %9s %9s %6s | %9s %9s %6s | %9s %9s %6s | %7s %7s\n" shape "train t/s" "torch" ratio "gen t/s" torch ratio "sample t/s" torch ratio "rss MB" torch
for s in $SHAPES; do
  A=""; B=""; C=""; D=""; E=""; F=""; R=""; Q=""
  for _ in $(seq "$REPS"); do
    if [ "${MATMUL:-f32}" = bf16 ]; then
      ours=$(RLHF_MATMUL=bf16 "$BIN" "$s" "$MODE"); theirs=$(AUTOCAST=bf16 "$PY" scripts/torch_bench.py "$s" "$MODE")
    else
      ours=$("$BIN" "$s" "$MODE"); theirs=$("$PY" scripts/torch_bench.py "$s" "$MODE")
    fi
    [ -n "${RAW:-}" ] && printf '%s\n%s\n' "$ours" "$theirs" >> "$RAW"
    A="$A $(echo "$ours" | field train 'tok/s')"; B="$B $(echo "$theirs" | field train 'tok/s')"
    C="$C $(echo "$ours" | field gen64 'new_tok/s')"; D="$D $(echo "$theirs" | field gen64 'new_tok/s')"
    E="$E $(echo "$ours" | field gen64-sample 'new_tok/s')"; F="$F $(echo "$theirs" | field gen64-sample 'new_tok/s')"
    R="$R $(echo "$ours" | rss)"; Q="$Q $(echo "$theirs" | rss)"
  done
  a=$(echo "$A" | median); b=$(echo "$B" | median); c=$(echo "$C" | median); d=$(echo "$D" | median)
  e=$(echo "$E" | median); f=$(echo "$F" | median)
  r=$(echo "$R" | median); q=$(echo "$Q" | median)
  ratio() { [ -n "$1" ] && [ -n "$2" ] && awk "BEGIN{printf \"%.2f\", $1/$2}" || echo -; }
  printf "%-11s %9s %9s %6s | %9s %9s %6s | %9s %9s %6s | %7s %7s\n" "$s" "${a:--}" "${b:--}" "$(ratio "$a" "$b")" \
    "${c:--}" "${d:--}" "$(ratio "$c" "$d")" "${e:--}" "${f:--}" "$(ratio "$e" "$f")" "${r:--}" "${q:--}"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
