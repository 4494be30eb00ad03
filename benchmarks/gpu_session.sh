#!/usr/bin/env bash
# What a GPU machine is asked first, in one go (about 10 minutes on one H200):
#   0. the sparse MoE ResNet-18 against its dense twin in the same mode, CUDA graphs and eager,
#      bf16: first the two targets of the GPU issue (224 x 224 at batch 64, 32 x 32 at batch 512),
#      then the grid of advmoe bench gpu for what is left of its 240 s;
#   1. every GPU code path once (python -m benchmarks.gpu_paths);
#   2. the training step of each method at full and at the study's width, and the sparse path
#      against the dense twin, on the GPU (advmoe bench methods / sparse --device cuda);
#   ship. the model to ship next (AdvMoE at width 0.5, router stride 2, validated with APGD):
#      three seeds at once, each trained and evaluated as the CPU study does; about 6 h per seed
#      on the 2-core CPU, minutes here. Results and checkpoints under OUT/ship, to copy into
#      reports/robustness_frontier/ and runs/frontier/ (docs/frontier.md);
#   3. the robustness study at full width: its estimated cost on this GPU (--plan), then as much
#      of it as the time left of SECONDS (default 570) allows; run again, it resumes.
# Each stage has a time limit of its own, so a slow one cannot take the others' time, and each
# writes its results as it goes. A loan of a few minutes goes further on what is still owed:
# STAGES names the stages to run (default all: graphs ship paths methods sparse study), PATHS the GPU paths
# of stage 1 (default all; names as gpu_paths prints them).
#
#   bash benchmarks/gpu_session.sh OUT [DATA_DIR] [SECONDS]
#   STAGES="paths sparse study" PATHS="eval-cuda" bash benchmarks/gpu_session.sh OUT
set -u
stages=" ${STAGES:-graphs ship paths methods sparse study} "
for stage in $stages; do
  case $stage in graphs|ship|paths|methods|sparse|study) ;; *) echo "STAGES: no stage '$stage'; the stages are graphs ship paths methods sparse study" >&2; exit 2;; esac
done
asked() { [[ $stages == *" $1 "* ]]; }
out=${1:?usage: bash benchmarks/gpu_session.sh OUT [DATA_DIR] [SECONDS]}
data=${2:-/usr/share/datasets/fashion-mnist}
deadline=$((SECONDS + ${3:-570}))
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi -L
"$python" -c "import torch, onnxruntime; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0)); print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

if asked graphs; then
  echo "== 0. sparse against dense in the same mode: CUDA graphs of static execution, and eager"
  gpu=("$python" -m benchmarks.bench_gpu --device cuda --precisions bf16 --splits 0.5)
  timeout 80 "${gpu[@]}" --image-sizes 224 --batch-sizes 64 --json "$out/gpu_224_b64.json"
  timeout 80 "${gpu[@]}" --image-sizes 32 --batch-sizes 512 --json "$out/gpu_32_b512.json"
  timeout 240 "$python" -m benchmarks.bench_gpu --device cuda --budget-s 200 --json "$out/gpu_grid.json"
fi

if asked ship; then
  echo "== ship. the width-0.5 model, three seeds at once"
  mkdir -p "$out/ship"
  for seed in 9 10 11; do
    timeout ${SHIP_SECONDS:-600} "$python" -m studies.frontier --curves --moe-widths 0.5 --experts 2 --dense-widths 0.25 \
      --rows advmoe-w0.5-ce_steps3 --variant rs2_vapgd_e10 --epochs 10 --seeds $seed --headline-seeds $seed --threads 4 \
      --set val_apgd_iterations=20 'select_on="worst"' router_stride=2 device=\"cuda\" data_dir=\"$data\" \
      --runs "$out/ship/runs" --results "$out/ship/results" --report "$out/ship/report.md" \
      > "$out/ship/seed$seed.log" 2>&1 &
  done
  wait
  tail -n 3 "$out"/ship/seed*.log
fi

if asked paths; then
  echo "== 1. GPU paths"
  timeout 330 "$python" -m benchmarks.gpu_paths --out "$out/paths" --data-dir "$data" --timeout 100 ${PATHS:+--only $PATHS}
fi

if asked methods; then
  echo "== 2. training step per method (batch 128), full width and the study's 0.25"
  for width in 1.0 0.25; do
    timeout 60 "$python" -m benchmarks.bench_methods --device cuda --width $width --rounds 5
  done
fi
if asked sparse; then
  echo "== 2. sparse against dense on the GPU (untrained, balanced routes)"
  timeout 60 "$python" -m benchmarks.bench_sparse --device cuda --archs resnet18 wrn28_10 --routers shared \
    --batch-sizes 1 64 256 --json "$out/sparse_gpu.json"
fi

if ! asked study; then echo "== done"; exit 0; fi
echo "== 3. the study at full width"
# results into the repository's folder: committed, they travel to the next GPU, and the study resumes
study=("$python" -m studies.frontier --moe-width 1.0 --set device=\"cuda\" data_dir=\"$data\"
       --runs "$out/study/runs" --results reports/robustness_frontier_gpu --report reports/robustness_frontier_gpu.md)
timeout 90 "${study[@]}" --plan
left=$((deadline - SECONDS))
if [ $left -gt 30 ]; then timeout $left "${study[@]}"; else echo "no time left for the study's runs"; fi
echo "== done"
