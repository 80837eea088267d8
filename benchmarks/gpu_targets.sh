#!/usr/bin/env bash
# The GPU targets of the open issues in one prepared run, sized for a short device lease (about 8 of
# its 15 minutes on an H100, so that there is time to rerun it). Run from the repository root on the
# GPU machine, with the machine's own python3 (PyTorch, Triton, transformers are there; kvlab from src/):
#
#     OUT=/some/folder bash benchmarks/gpu_targets.sh        # the device tool sets $OUT; results land there
#     DEVICE=cpu bash benchmarks/gpu_targets.sh              # here, on a CPU: tiny shapes, checks the script
#
# 1. The Triton kernels compiled for the GPU: forward and backward against a float64 reference
#    (tests/attention/test_kernels_cuda.py), then their speed against SDPA (benchmarks/attention_gpu.py).
# 2. Decode: shrink's candidates at SmolLM2-135M's shapes (random weights: speed does not depend on
#    them) against the original at 1k/4k/16k tokens, bf16 (issue 39: "decode faster than the original
#    from 4k tokens").
# 3. kvlab shrink --device cuda end to end on a model this script trains (a tiny byte-level one):
#    the recipe's CUDA path. SmolLM2-135M itself cannot go: its weights (a 98 MB GGUF) are over the
#    device's 64 MiB transfer limit and the machine reaches no network, so the issue's quality target
#    on it (4x <= +1.5 % with --minutes 30) is not measurable through this tool.
#
# Each step has its own time limit and the script goes on when one fails; every log ends in $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then SMOKE=--smoke; export TRITON_INTERPRET=1; else SMOKE=; fi

step() {   # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.is_available())"
} >"$OUT/summary.txt" 2>&1

step kernels_tests 150 $PY -m pytest -q -x -p no:cacheprovider tests/attention/test_kernels_cuda.py
step attention_speed 150 $PY benchmarks/attention_gpu.py $SMOKE --out "$OUT/attention_gpu.json"
step decode_candidates 150 $PY benchmarks/gpu_decode_candidates.py $SMOKE --device "$DEVICE" \
    --contexts 1024,4096,16384 --batch 16 --out "$OUT/decode_candidates.json"
step shrink_cuda 120 $PY - "$OUT" "$DEVICE" <<'EOF'
import sys, time
from pathlib import Path

import kvlab
from kvlab import ModelConfig
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import Windows, tokenize_to_file
from kvlab.io import save_checkpoint
from kvlab.recipes.pretrain import new_byte_level_model
from kvlab.recipes.shrink import ShrinkConfig, run_shrink
from kvlab.training import TrainConfig, train

out, device = Path(sys.argv[1]), sys.argv[2]
work = Path("/tmp/kvlab-gpu")
model = new_byte_level_model(ModelConfig.from_preset("tiny", max_seq_len=256)).to(device)
tokens = tokenize_to_file(builtin_corpus("train"), model.tokenizer, cache_dir=work, progress=False).tokens
train(model, Windows(tokens, 64, 16, seed=0), None,
      TrainConfig(out_dir=str(work / "run"), max_steps=200, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=8,
                  eval_every=10**9, save_every=10**9, log_every=10**9), quiet=True)
save_checkpoint(model, work / "model")
t = time.perf_counter()
results = run_shrink(str(work / "model"), work / "shrunk", ShrinkConfig.quick(device=device), log=print,
                     overwrite=True)
print(f"shrink on {device}: chose {results['best']} in {time.perf_counter() - t:.0f} s")
(out / "shrink_cuda_report.md").write_text((work / "shrunk" / "report.md").read_text())
EOF
cat "$OUT/summary.txt"
