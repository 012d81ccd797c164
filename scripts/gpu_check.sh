#!/usr/bin/env bash
# The GPU check: the CUDA bench table, the bf16 / fp32 / torch.compile paths, and a short real sweep.
#
#   bash scripts/gpu_check.sh                       # on a bare GPU machine, from a clean clone
#   bash scripts/gpu_check.sh --device cpu --small  # the same steps on the CPU at small sizes (CI)
#
# Parts (--parts, comma-separated; default all, in this order), each well under 10 minutes on one
# H100/H200 so that they fit the device tool's per-command limit when run one by one:
#   install  scripts/install.sh unless .venv already imports peftbench and torch
#   bench    peftbench bench for the methods of the E^2VPT paper's table, fp32 and bf16, eager
#   compile  the same methods under torch.compile (bf16 and fp32): rows appended to the same table
#   checks   scripts/gpu_checks.py: bf16 vs fp32 logits of e2vpt and vpt-deep, fused SDPA vs explicit attention
#   fused    --fuse on the device: scripts/fused_step.py (one step of 4 configurations, separate vs fused) and
#            scripts/fused_vs_sequential.py (the demo lr grids trained both ways; --small: 2 methods, 1 epoch)
#   sweep    the demo suite end to end on the device (run store + leaderboard), then one demo task at
#            224 px on ViT-B/16 (random weights from a local --checkpoint file: no hub) for 2 epochs
#            (--small: ViT-Ti/16, e2vpt only, 1 epoch)
#   paper    --protocol paper for the E^2VPT paper's methods (e2vpt, vpt-deep): the dry run (each recipe with its
#            sources, its cost beside the unified protocol's, from the bench table just measured); and, when the
#            machine holds VTAB-1k data ($PEFTBENCH_DATA with vtab/dtd, or --paper-data DIR), e2vpt on DTD
#            under its paper recipe, one seed, beside the paper's DTD cell in the leaderboard (no data: said so,
#            and skipped, never faked)
#
# Outputs (--out, default results/): bench-cuda-<gpu>-<backbone>.csv (or bench-cpu-...), gpu-check-<dev>.json,
# gpu-sweep-<dev>/ (leaderboards of the two sweeps). Any failure stops the script with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
SMALL=0
PARTS=install,bench,compile,checks,fused,sweep,paper
PAPER_DATA="${PEFTBENCH_DATA:-}"
OUT=results
RUNS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --parts) PARTS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --paper-data) PAPER_DATA="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
has() { [[ ",$PARTS," == *",$1,"* ]]; }
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

if has install; then
  if [ -x "$PY" ] && "$PY" -c "import peftbench, torch, timm" 2>/dev/null; then
    stamp "install: .venv is ready"
  else
    stamp "install (scripts/install.sh)"
    bash scripts/install.sh
  fi
fi

if [ "$DEVICE" = "cuda" ]; then
  "$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: --device cuda but torch sees no GPU (use --device cpu --small to rehearse on a CPU)")
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
fi

# the methods of the E^2VPT paper's table (Table 1: full, linear, partial-1, mlp-3, bias, adapter, lora,
# vpt-shallow, vpt-deep, e2vpt; pruned e2vpt)
METHODS=linear,full,partial-1,mlp-3,bitfit,adapter,lora,vpt-shallow,vpt-deep,e2vpt,e2vpt-prune
if [ "$SMALL" = 1 ]; then
  BACKBONE=demo-vit-random; BATCH=4; WARMUP=1; STEPS=1; SETS=(--set prompt_tokens=4 --set kv_tokens=2 --set e2vpt-prune.prune_tokens=2)
  COMPILE_METHODS=linear,e2vpt; BIG_BACKBONE=vit_tiny_patch16_224; CHECK_BATCH=8; BIG_METHODS=e2vpt; BIG_EPOCHS=1
  FUSE=2; FUSED_EXTRA=(--methods linear,vpt-deep --epochs 1); STEP_EXTRA=(--batch-size 8 --steps 2)
else
  BACKBONE=vit_base_patch16_224; BATCH=64; WARMUP=3; STEPS=10; SETS=()
  COMPILE_METHODS=$METHODS; BIG_BACKBONE=vit_base_patch16_224; CHECK_BATCH=32; BIG_METHODS=e2vpt,vpt-deep; BIG_EPOCHS=2
  FUSE=4,8; FUSED_EXTRA=(); STEP_EXTRA=()
fi
mkdir -p "$OUT"
BENCH_OUT=$(mktemp -d)
TABLE_OF() { ls "$1"/bench-*-"$BACKBONE".csv; }

if has bench; then
  stamp "bench (eager, fp32 + bf16) on $BACKBONE, batch $BATCH"
  "$PY" -m peftbench bench --device "$DEVICE" --backbone "$BACKBONE" --batch-size "$BATCH" --methods "$METHODS" \
    --precision fp32,bf16 --warmup "$WARMUP" --steps "$STEPS" "${SETS[@]}" --fuse "$FUSE" --out "$BENCH_OUT/eager"
  cp "$(TABLE_OF "$BENCH_OUT/eager")" "$OUT/"
  cp "$BENCH_OUT"/eager/*-linear-probe.json "$OUT/" 2>/dev/null || true
fi

if has compile; then
  stamp "bench (torch.compile, fp32 + bf16) on $BACKBONE"
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
  "$PY" -m peftbench bench --device "$DEVICE" --backbone "$BACKBONE" --batch-size "$BATCH" --methods "$COMPILE_METHODS" \
    --precision fp32,bf16 --compile on --warmup "$WARMUP" --steps "$STEPS" "${SETS[@]}" --no-probe --out "$BENCH_OUT/compiled"
  table="$OUT/$(basename "$(TABLE_OF "$BENCH_OUT/compiled")")"
  if [ -f "$table" ]; then  # append the compiled rows to the eager table (one header)
    tail -n +2 "$(TABLE_OF "$BENCH_OUT/compiled")" >> "$table"
  else
    cp "$(TABLE_OF "$BENCH_OUT/compiled")" "$table"
  fi
fi

if has checks; then
  stamp "numerical checks (bf16 vs fp32, fused SDPA vs explicit attention)"
  "$PY" scripts/gpu_checks.py --device "$DEVICE" --backbone "$BACKBONE" --batch-size "$CHECK_BATCH" "${SETS[@]}" \
    --out "$OUT/gpu-check-$DEVICE.json"
fi

if has fused; then
  stamp "fused configurations on $DEVICE: one step, then the demo lr grids separate vs --fuse 4"
  "$PY" scripts/fused_step.py --device "$DEVICE" --methods vpt-deep,lora,e2vpt "${STEP_EXTRA[@]}" | tee "$OUT/fused-step-$DEVICE.md"
  "$PY" scripts/fused_vs_sequential.py --device "$DEVICE" --tasks demo_digits "${FUSED_EXTRA[@]}" \
    --out "$OUT/fused-vs-sequential-$DEVICE.csv"
fi

if has sweep; then
  RUNS=${RUNS:-$(mktemp -d)/runs}
  stamp "sweep: the demo suite on $DEVICE (runs in $RUNS/demo)"
  SWEEP_METHODS=linear,vpt-deep,e2vpt,lora
  [ "$SMALL" = 1 ] && SWEEP_EXTRA=(--tasks demo_animals,demo_digits --epochs 2) || SWEEP_EXTRA=()
  "$PY" -m peftbench run --suite demo --methods "$SWEEP_METHODS" --device "$DEVICE" --runs-dir "$RUNS/demo" \
    --quiet "${SWEEP_EXTRA[@]}"
  "$PY" -m peftbench leaderboard --runs-dir "$RUNS/demo" --suite demo --out "$OUT/gpu-sweep-$DEVICE/demo" --force

  stamp "sweep: one demo task at 224 px on $BIG_BACKBONE (random weights from a local checkpoint), $BIG_EPOCHS epoch(s)"
  CKPT="$(dirname "$RUNS")/$BIG_BACKBONE-random.safetensors"
  "$PY" - "$BIG_BACKBONE" "$CKPT" <<'EOF'
import sys, timm, torch
from safetensors.torch import save_file
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=False, num_classes=0)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
EOF
  "$PY" -m peftbench run --suite demo --tasks demo_animals --methods "$BIG_METHODS" --backbone "$BIG_BACKBONE" \
    --checkpoint "$CKPT" --protocol fixed --epochs "$BIG_EPOCHS" --seeds 1 --device "$DEVICE" --runs-dir "$RUNS/vitb224"
  "$PY" -m peftbench leaderboard --runs-dir "$RUNS/vitb224" --suite demo --out "$OUT/gpu-sweep-$DEVICE/vitb224" --force
fi
if has paper; then
  stamp "paper: the dry run of --protocol paper for e2vpt and vpt-deep on VTAB-1k (recipes, sources, costs)"
  TABLE_ARGS=()
  for t in "$OUT"/bench-"$DEVICE"-*vit_base_patch16_224*.csv; do [ -f "$t" ] && TABLE_ARGS=(--bench-table "$t"); done
  "$PY" -m peftbench run --methods e2vpt,vpt-deep --suite vtab --protocol paper --dry-run "${TABLE_ARGS[@]}" \
    | tee "$OUT/gpu-paper-dry-run-$DEVICE.txt" | grep -E "^(e2vpt|vpt-deep):|^total|^protocols|^  (paper|vpt) "
  if [ -n "$PAPER_DATA" ] && [ -d "$PAPER_DATA/vtab/dtd" ] && [ "$SMALL" = 0 ]; then
    RUNS=${RUNS:-$(mktemp -d)/runs}
    stamp "paper: e2vpt on DTD under its paper recipe (one seed), beside the paper's cell"
    "$PY" -m peftbench run --methods e2vpt --suite vtab --tasks dtd --protocol paper --seeds 42 --device "$DEVICE" \
      --data-root "$PAPER_DATA" --runs-dir "$RUNS/paper" --quiet
    "$PY" -m peftbench leaderboard --runs-dir "$RUNS/paper" --suite vtab --out "$OUT/gpu-sweep-$DEVICE/paper" --force
  else
    stamp "paper: no VTAB-1k data on this machine (\$PEFTBENCH_DATA/vtab/dtd or --paper-data): the training part is skipped"
  fi
fi
stamp "gpu_check.sh: all parts passed ($PARTS)"
