#!/usr/bin/env bash
# One self-contained GPU check of the trainers, for a lent H200 machine (bare image: python3 with torch; the rest of
# requirements.txt travels as wheels in .whl/, see below). Launched once, from the repository root, with the device
# tool:   run(command="bash benchmarks/gpu_check_sdxl.sh", carry=[".whl"], timeout_s=540)
# The wheels (pure Python except regex and wcwidth; ~23 MB; .whl/ is git-ignored, so fetch them first, here):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 transformers==5.23.0 huggingface-hub==2.4.0 toml==0.10.2 voluptuous==0.16.0 \
#     imagesize==2.0.1 ftfy==6.3.1 wcwidth==0.9.4 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
#     regex==2026.11.15 peft==0.21.2 anyio==4.16.0 idna==3.20 typing_extensions==4.16.0
# (huggingface-hub 2.4 needs httpx2; transformers refuses an older regex; diffusers imports peft at start-up.)
# Stage D also needs DeepSpeed and what the image lacks of its needs (~5 MB more):
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8 -w .whl    (built here: DeepSpeed ships no wheel)
#   python3 -m pip download ... (as above) hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5
#
# Stages, cheap correctness first, expensive last (a failing stage is reported and the next one runs):
#   A  tiny random-weight models on CUDA (tools/make_tiny_model.py + tools/make_synthetic_dataset.py, as README.md):
#      A1/A2 README's headline train_network.py LoRA command (AdamW for AdamW8bit), bf16 / fp16 mixed precision;
#      A3 sdxl_train_network.py, README's SDXL try-it (both text encoders + U-Net, sample image), bf16;
#      A4 sdxl_train_network.py, README's walkthrough (--network_train_unet_only --cache_text_encoder_outputs), bf16;
#      A5 sdxl_train.py, README's 24 GB recipe (Adafactor + --fused_backward_pass --full_bf16 --gradient_checkpointing);
#      A6 train_db.py, README's DreamBooth try-it (class images generated first), fp16 mixed precision.
#      Each trains 4 steps and saves; its outputs are then read back (benchmarks/cuda_peak.py --check): every
#      tensor finite, LoRAs through diffusers' lora_state_dict, models through library.sd_checkpoint.
#   D  DeepSpeed (issue 15): full-size SD 1.5 with random weights (built in the background), train_db.py full
#      fine-tune at 512 px, AdamW, bf16, grad checkpointing, cached latents, 5 steps: D1 without DeepSpeed, D2 with
#      --deepspeed --zero_stage 2 --offload_optimizer_device cpu (DeepSpeed's CPU Adam is compiled on first use, inside
#      D2's time). Peak CUDA memory side by side. GPU_CHECK_STAGES=D runs only setup + D (default: A D B).
#   B  full-size SDXL with random weights (library.tiny_models.build_random_models, ModelSize.FULL, perturb=False),
#      written once as an fp16 .safetensors (built in the background while stage A runs), 4 synthetic captioned
#      images trained at 1024x1024 (no bucketing: each image is resized / cropped to 1024x1024):
#      B1 sdxl_train_network.py U-Net LoRA dim 16, bf16, cached latents + text-encoder outputs, grad checkpointing,
#         10 steps; B2 the same without grad checkpointing; B3 sdxl_train.py full fine-tune (Adafactor fused
#         backward, --full_bf16, grad checkpointing, cached latents + text-encoder outputs), 6 steps.
#      s/step: median over steps 3..N from the run's TensorBoard log; CUDA peaks of the whole process and of the
#      steps 2..N alone (benchmarks/cuda_peak.py). The final save is skipped (SDTRAIN_STOP_AFTER_STEPS).
# Output: everything in $OUT/gpu_check.log; the table in $OUT/summary.txt; one JSON record per run in
# $OUT/records.jsonl.
#
# Smoke mode, on a CPU:  OUT=/tmp/gpucheck_out PYTHON=.venv/bin/python GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check_sdxl.sh
# runs every stage, stage B with the TINY SDXL model at 64 px and 3 steps. The wheels are installed only when PYTHON
# is not given (GPU_CHECK_WHEELS=1 forces it). GPU_CHECK_BUDGET_S: seconds after which no stage starts (and each
# stage's time limit is cut to fit; default 500, 3600 in smoke mode).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
SMOKE=${GPU_CHECK_SMOKE:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
mkdir -p "$OUT" || exit 1
rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
LOG=$OUT/gpu_check.log
RECORDS=$OUT/records.jsonl
STATUS=$WORK/status.tsv
: >"$LOG"; : >"$RECORDS"; : >"$STATUS"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# FP16: the precision of the fp16 stages (A2, A6); the trainers refuse fp16 mixed precision without CUDA, so the
# smoke run on a CPU runs those stages in bf16.
if [[ $SMOKE == 1 ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-3600}; CAP_SCALE=4; B_SIZE=tiny; B_RES=64; B_STEPS_LORA=3; B_STEPS_FT=3; FP16=bf16
  D_RES=64
else
  BUDGET=${GPU_CHECK_BUDGET_S:-500}; CAP_SCALE=1; B_SIZE=full; B_RES=1024; B_STEPS_LORA=10; B_STEPS_FT=6; FP16=fp16
  D_RES=512
fi

echo "=== gpu_check_sdxl.sh  $(date -u +%FT%TZ)  smoke=$SMOKE  python=$PY  budget=${BUDGET}s  work=$WORK  out=$OUT"

# --- wheels: what the bare image lacks (or has in other versions than requirements.txt) -----------------------------
if [[ -z ${PYTHON:-} || ${GPU_CHECK_WHEELS:-0} == 1 ]]; then
  echo "=== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "FATAL: wheel install failed" | tee "$OUT/summary.txt"; exit 1; }
else
  echo "=== PYTHON given: no wheel install"
  export PYTHONPATH=$PWD
fi
"$PY" -c "
import sys, torch, diffusers, transformers, huggingface_hub, accelerate, peft, safetensors, tokenizers, toml, voluptuous, imagesize, ftfy
print('python', sys.version.split()[0], '| torch', torch.__version__, '| diffusers', diffusers.__version__,
      '| transformers', transformers.__version__, '| huggingface_hub', huggingface_hub.__version__,
      '| accelerate', accelerate.__version__, '| peft', peft.__version__, '| safetensors', safetensors.__version__,
      '| tokenizers', tokenizers.__version__, '| toml', toml.__version__)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')
" || { echo "FATAL: the imports failed (see gpu_check.log)" | tee "$OUT/summary.txt"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "nproc $(nproc), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/2^20}' /proc/meminfo), $(df -h /tmp | awk 'NR==2 {print $4 " free in /tmp"}')"

# --- helpers ---------------------------------------------------------------------------------------------------------
STAGE_LIMIT=60
RESERVE=0  # seconds of the budget that a stage leaves for the stages after it (set before each group)
# wrap ARGS...: benchmarks/cuda_peak.py (CUDA peaks, step times, output checks; JSON record to records.jsonl), stopped
# by its own --time-limit at the stage's limit (it still reports), with `timeout` as a safety net behind it.
wrap() {
  timeout --kill-after=15 $((STAGE_LIMIT + 30)) \
    "$PY" "$ROOT/benchmarks/cuda_peak.py" --json "$RECORDS" --time-limit "$STAGE_LIMIT" "$@"
}

# stage ID DESCRIPTION CAP_S CMD...: run CMD (a command or one of the functions below, which read STAGE_LIMIT) with
# a time limit of CAP_S (x CAP_SCALE), cut to what the budget leaves after RESERVE; print its status and elapsed
# seconds. Skipped when under 25 s are left. ID is the tag of the run's record in records.jsonl.
stage() {
  local id=$1 desc=$2 cap=$(($3 * CAP_SCALE)); shift 3
  local left=$((BUDGET - SECONDS - 5 - RESERVE))
  echo
  echo "=================================================================================================="
  if ((left < 25)); then
    echo "=== [$id] $desc: SKIPPED, only $((BUDGET - SECONDS))s of the ${BUDGET}s budget left (${RESERVE}s kept for later stages)"
    printf '%s\t%s\tskipped\t0\n' "$id" "$desc" >>"$STATUS"
    return 0
  fi
  STAGE_LIMIT=$((cap < left ? cap : left))
  echo "=== [$id] $desc"
  echo "=== [$id] start at +${SECONDS}s, time limit ${STAGE_LIMIT}s"
  echo "=================================================================================================="
  local t0=$SECONDS rc
  "$@"
  rc=$?
  local dt=$((SECONDS - t0))
  if ((rc == 0)); then
    echo "=== [$id] OK in ${dt}s"
  elif ((rc == 124 || rc == 137)); then
    echo "=== [$id] FAILED: time limit ${STAGE_LIMIT}s reached (rc $rc) after ${dt}s"
  else
    echo "=== [$id] FAILED (rc $rc) after ${dt}s"
  fi
  printf '%s\t%s\t%s\t%s\n' "$id" "$desc" "$rc" "$dt" >>"$STATUS"
}

# --- setup: tiny models, data, and (in the background) the stage-B model --------------------------------------------
W=$WORK
cat >"$W/build_model.py" <<'PY'
# The stage-B model: random weights (library.tiny_models.build_random_models, perturb=False, as
# benchmarks/bench_common.build_model), built on the GPU when there is one (CPU fallback), saved once as fp16.
import os, time
import torch
from library.checkpoint_writer import SaveFormat, save_checkpoint
from library.families import FAMILIES, ModelSize
from library.model_loading import checkpoint_from_models
from library.tiny_models import build_random_models

size, dest, family = ModelSize(os.environ["SIZE"]), os.environ["DEST"], os.environ.get("FAMILY", "sdxl")


def build(device: str) -> None:
    t0 = time.perf_counter()
    with torch.device(device):
        models = build_random_models(FAMILIES[family], size, seed=0, perturb=False)
    params = {c: sum(p.numel() for p in models.component(c).parameters()) for c in models.family.components}
    print(f"built {size.value} {family} on {device} in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{c} {n / 1e6:.0f}M" for c, n in params.items()), flush=True)
    t0 = time.perf_counter()
    save_checkpoint(checkpoint_from_models(models), dest, SaveFormat.SAFETENSORS, dtype=torch.float16)
    print(f"wrote {dest} (fp16, {os.path.getsize(dest) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s",
          flush=True)


if torch.cuda.is_available():
    try:
        build("cuda")
    except Exception as e:  # noqa: BLE001
        print(f"building on cuda failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
        torch.cuda.empty_cache()
        build("cpu")
else:
    build("cpu")
PY

setup() {
  local pids=() rc=0 t=$((STAGE_LIMIT - 5))
  timeout "$t" "$PY" tools/make_tiny_model.py --family sd1 "$W/tiny_sd1.safetensors" & pids+=($!)
  timeout "$t" "$PY" tools/make_tiny_model.py --family sdxl "$W/tiny_sdxl.safetensors" & pids+=($!)
  timeout "$t" "$PY" tools/make_synthetic_dataset.py "$W/data" --images 4 --size 64 --reg & pids+=($!)
  timeout "$t" "$PY" tools/make_synthetic_dataset.py "$W/data_b" --images 4 --size "$B_RES" & pids+=($!)
  timeout "$t" "$PY" tools/make_synthetic_dataset.py "$W/data_d" --images 4 --size "$D_RES" & pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  printf 'sks shape, red circle --n blurry --d 1 --s 4\n' >"$W/prompts.txt"
  return $rc
}

B_MODEL=$W/sdxl_$B_SIZE.safetensors
B0_START=$SECONDS
echo "=== [B0] building the $B_SIZE SDXL model in the background from +${SECONDS}s (log: $W/build.log)"
STAGES=${GPU_CHECK_STAGES:-A D B}
has() { [[ " $STAGES " == *" $1 "* ]]; }
BUILD_PID=
if has B; then
  SIZE=$B_SIZE DEST=$B_MODEL FAMILY=sdxl timeout --kill-after=15 $((360 * CAP_SCALE)) "$PY" "$W/build_model.py" \
    >"$W/build.log" 2>&1 &
  BUILD_PID=$!
fi
D_MODEL=$W/sd15_$B_SIZE.safetensors
D_BUILD_PID=
if has D; then
  echo "=== [D0] building the $B_SIZE SD 1.5 model in the background from +${SECONDS}s (log: $W/build_d.log)"
  SIZE=$B_SIZE DEST=$D_MODEL FAMILY=sd1 timeout --kill-after=15 $((240 * CAP_SCALE)) "$PY" "$W/build_model.py" \
    >"$W/build_d.log" 2>&1 &
  D_BUILD_PID=$!
fi
stage A0 "setup: tiny SD 1.x + SDXL models (tools/make_tiny_model.py), synthetic data" 60 setup

# --- stage A: tiny models, every trainer users run -------------------------------------------------------------------
if has A; then
((SMOKE == 1)) || { has D && RESERVE=220 || RESERVE=240; }  # stage D's / B's share of the budget
tn_headline() {  # ID PRECISION: README's headline train_network.py command, tiny-sized (AdamW for AdamW8bit, 4 steps)
  local o=$W/a_tn_$2
  wrap --tag "$1" --check "$o/sks_dog.safetensors" train_network.py \
    --pretrained_model_name_or_path "$W/tiny_sd1.safetensors" \
    --train_data_dir "$W/data" --reg_data_dir "$W/data_reg" --prior_loss_weight 1.0 \
    --output_dir "$o" --output_name sks_dog --save_model_as safetensors \
    --resolution 64 --enable_bucket --min_bucket_reso 32 --max_bucket_reso 128 --bucket_reso_steps 32 \
    --network_module networks.lora --network_dim 16 --network_alpha 8 \
    --learning_rate 1e-4 --unet_lr 1e-4 --text_encoder_lr 5e-5 --optimizer_type AdamW \
    --lr_scheduler cosine --lr_warmup_steps 0.05 --max_train_steps 4 --train_batch_size 2 \
    --mixed_precision "$2" --cache_latents --gradient_checkpointing --caption_extension .caption \
    --save_every_n_epochs 2 --save_state --logging_dir "$o/logs" --seed 42
}
stage A1 "train_network.py LoRA, README headline command, bf16" 75 tn_headline A1 bf16
stage A2 "train_network.py LoRA, README headline command, $FP16" 75 tn_headline A2 "$FP16"

stage A3 "sdxl_train_network.py LoRA bf16, both text encoders + U-Net, sample image (README try-it)" 75 \
  wrap --tag A3 --check "$W/a_xl_te/tiny_xl_lora.safetensors" sdxl_train_network.py \
  --pretrained_model_name_or_path "$W/tiny_sdxl.safetensors" \
  --train_data_dir "$W/data" --output_dir "$W/a_xl_te" --output_name tiny_xl_lora --resolution 64 \
  --bucket_reso_steps 32 --network_dim 4 --network_alpha 2 --learning_rate 1e-3 --text_encoder_lr 5e-4 2e-4 \
  --max_train_steps 4 --train_batch_size 2 --cache_latents --seed 42 --mixed_precision bf16 \
  --sample_prompts "$W/prompts.txt" --sample_every_n_steps 4

stage A4 "sdxl_train_network.py LoRA bf16 --network_train_unet_only --cache_text_encoder_outputs (walkthrough)" 75 \
  wrap --tag A4 --check "$W/a_xl_unet/cttoy.safetensors" --check "$W/a_xl_unet/cttoy_diffusers.safetensors" \
  sdxl_train_network.py --pretrained_model_name_or_path "$W/tiny_sdxl.safetensors" \
  --train_data_dir "$W/data" --output_dir "$W/a_xl_unet" --output_name cttoy \
  --resolution 64 --enable_bucket --min_bucket_reso 32 --max_bucket_reso 128 --bucket_reso_steps 32 \
  --network_dim 16 --network_alpha 16 --learning_rate 1e-4 --max_train_steps 4 --train_batch_size 1 \
  --mixed_precision bf16 --no_half_vae --network_train_unet_only --cache_latents --cache_text_encoder_outputs \
  --gradient_checkpointing --save_lora_format kohya diffusers --seed 0

stage A5 "sdxl_train.py --full_bf16, Adafactor --fused_backward_pass, grad checkpointing (README 24 GB recipe)" 75 \
  wrap --tag A5 --check "$W/a_xl_ft/tiny_sdxl_ft.safetensors" --base "$W/tiny_sdxl.safetensors" sdxl_train.py \
  --pretrained_model_name_or_path "$W/tiny_sdxl.safetensors" \
  --train_data_dir "$W/data" --reg_data_dir "$W/data_reg" --prior_loss_weight 1.0 \
  --output_dir "$W/a_xl_ft" --output_name tiny_sdxl_ft --save_model_as safetensors \
  --resolution 64 --enable_bucket --min_bucket_reso 32 --max_bucket_reso 128 --bucket_reso_steps 32 \
  --learning_rate 1e-3 \
  --optimizer_type Adafactor --optimizer_args scale_parameter=False relative_step=False warmup_init=False \
  --fused_backward_pass --mixed_precision bf16 --full_bf16 --gradient_checkpointing --no_half_vae \
  --cache_latents --cache_text_encoder_outputs --max_train_steps 4 --seed 0

stage A6 "train_db.py DreamBooth, $FP16 mixed precision, class images generated first (README try-it)" 75 \
  wrap --tag A6 --check "$W/a_db/tiny_db.safetensors" --base "$W/tiny_sd1.safetensors" train_db.py \
  --pretrained_model_name_or_path "$W/tiny_sd1.safetensors" \
  --train_data_dir "$W/data" --reg_data_dir "$W/a_class" --class_prompt "shape" --num_class_images 2 \
  --sample_batch_size 2 --prior_loss_weight 1.0 --output_dir "$W/a_db" --output_name tiny_db \
  --caption_extension .caption --resolution 64 --learning_rate 1e-5 --learning_rate_te 5e-6 \
  --stop_text_encoder_training 2 --max_train_steps 4 --train_batch_size 1 --cache_latents \
  --mixed_precision "$FP16" --gradient_checkpointing --save_every_n_steps 2 --save_state --seed 0

xl_controlnet() {  # sdxl_train_control_net.py: Canny edges of the data as conditions, cached TE outputs, validation
  local sub
  sub=$(ls "$W/data" | head -1)
  "$PY" tools/canny.py --input "$W/data/$sub" --output "$W/edges" --thres1 16 --thres2 64 || return 1
  wrap --tag A7 --check "$W/a_xl_cn/cn_xl.safetensors" sdxl_train_control_net.py \
    --pretrained_model_name_or_path "$W/tiny_sdxl.safetensors" --train_data_dir "$W/data" \
    --conditioning_data_dir "$W/edges" --output_dir "$W/a_xl_cn" --output_name cn_xl --resolution 64 \
    --bucket_reso_steps 32 --max_train_steps 4 --train_batch_size 2 --mixed_precision bf16 --cache_latents \
    --cache_text_encoder_outputs --gradient_checkpointing --validation_image "$(ls "$W"/edges/*.png | head -1)" \
    --validation_prompt "sks shape" --validation_steps 4 --num_validation_images 1 --seed 0
}
stage A7 "sdxl_train_control_net.py bf16, cached TE outputs, validation grid" 75 xl_controlnet
fi

# --- stage D: DeepSpeed ZeRO-2 with the optimizer on the CPU, full-size SD 1.5 --------------------------------------
wait_build_d() {
  local rc deadline=$((SECONDS + STAGE_LIMIT))
  while kill -0 "$D_BUILD_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
  kill -0 "$D_BUILD_PID" 2>/dev/null && kill "$D_BUILD_PID"
  wait "$D_BUILD_PID"
  rc=$?
  cat "$W/build_d.log"
  ((rc == 0)) && [[ -s $D_MODEL ]]
}
ft_d() (  # ID [flags]: train_db.py full fine-tune of the U-Net, final save skipped
  id=$1; shift
  [[ -s $D_MODEL ]] || { echo "no stage-D model (D0 failed)"; exit 2; }
  export SDTRAIN_STOP_AFTER_STEPS=5
  wrap --tag "$id" --logging-dir "$W/$id/logs" train_db.py --pretrained_model_name_or_path "$D_MODEL" \
    --train_data_dir "$W/data_d" --output_dir "$W/$id" --output_name db --logging_dir "$W/$id/logs" \
    --resolution "$D_RES" --train_batch_size 1 --mixed_precision bf16 --cache_latents --gradient_checkpointing \
    --optimizer_type AdamW --learning_rate 1e-6 --max_train_steps 5 --max_data_loader_n_workers 0 \
    --stop_text_encoder_training 0 --seed 0 "$@"
)
if has D; then
  RESERVE=0
  ((SMOKE == 1)) || { has B && RESERVE=100; }
  stage D0 "$B_SIZE SD 1.5, random weights -> fp16 .safetensors (wait for the background build)" 120 wait_build_d
  stage D1 "train_db.py full fine-tune, $D_RES px, AdamW, bf16, grad ckpt, 5 steps, without DeepSpeed" 90 ft_d D1
  stage D2 "train_db.py as D1 with --deepspeed --zero_stage 2 --offload_optimizer_device cpu" 200 \
    ft_d D2 --deepspeed --zero_stage 2 --offload_optimizer_device cpu
fi

# --- stage B: full-size SDXL -----------------------------------------------------------------------------------------
if has B; then
wait_build() {
  local rc deadline=$((SECONDS + STAGE_LIMIT))
  while kill -0 "$BUILD_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    echo "the build is still running at the stage's time limit: stopping it"
    kill "$BUILD_PID"  # the `timeout` in front of it passes the signal on
  fi
  wait "$BUILD_PID"
  rc=$?
  cat "$W/build.log"
  echo "(the build ran in the background from +${B0_START}s to at most +${SECONDS}s, overlapping stage A; rc $rc)"
  ((rc == 0)) && [[ -s $B_MODEL ]]
}
RESERVE=0
stage B0 "$B_SIZE SDXL, random weights -> fp16 .safetensors (wait for the background build)" 240 wait_build
df -h /tmp | awk 'NR==2 {print "/tmp: " $3 " used, " $4 " free"}'

B_COMMON=(--pretrained_model_name_or_path "$B_MODEL" --train_data_dir "$W/data_b" --resolution "$B_RES"
          --train_batch_size 1 --mixed_precision bf16 --no_half_vae --cache_latents --cache_text_encoder_outputs
          --max_data_loader_n_workers 0 --seed 0)
lora_b() (  # ID [--gradient_checkpointing]: U-Net LoRA, final save skipped
  id=$1; shift
  [[ -s $B_MODEL ]] || { echo "no stage-B model (B0 failed)"; exit 2; }
  export SDTRAIN_STOP_AFTER_STEPS=$B_STEPS_LORA
  wrap --tag "$id" --logging-dir "$W/$id/logs" sdxl_train_network.py "${B_COMMON[@]}" \
    --output_dir "$W/$id" --output_name lora --logging_dir "$W/$id/logs" \
    --network_module networks.lora --network_dim 16 --network_alpha 16 --network_train_unet_only \
    --learning_rate 1e-4 --optimizer_type AdamW --max_train_steps "$B_STEPS_LORA" "$@"
)
ft_b() (  # full fine-tune, final save skipped
  [[ -s $B_MODEL ]] || { echo "no stage-B model (B0 failed)"; exit 2; }
  export SDTRAIN_STOP_AFTER_STEPS=$B_STEPS_FT
  wrap --tag B3 --logging-dir "$W/B3/logs" sdxl_train.py "${B_COMMON[@]}" \
    --output_dir "$W/B3" --output_name ft --logging_dir "$W/B3/logs" --learning_rate 1e-5 \
    --optimizer_type Adafactor --optimizer_args scale_parameter=False relative_step=False warmup_init=False \
    --fused_backward_pass --full_bf16 --gradient_checkpointing --max_train_steps "$B_STEPS_FT"
)
((SMOKE == 1)) || RESERVE=120  # what B1 leaves for B2 + B3 at least
stage B1 "sdxl_train_network.py U-Net LoRA dim 16, $B_RES px, bf16, grad checkpointing, $B_STEPS_LORA steps" 170 \
  lora_b B1 --gradient_checkpointing
((SMOKE == 1)) || RESERVE=100  # what B2 leaves for B3 at least
stage B2 "sdxl_train_network.py U-Net LoRA dim 16, $B_RES px, bf16, no grad checkpointing, $B_STEPS_LORA steps" 150 \
  lora_b B2
RESERVE=0
stage B3 "sdxl_train.py full fine-tune, Adafactor fused, --full_bf16, grad ckpt, $B_RES px, $B_STEPS_FT steps" 200 ft_b
fi

# --- summary ---------------------------------------------------------------------------------------------------------
[[ -n $BUILD_PID ]] && kill "$BUILD_PID" 2>/dev/null && echo "(stopped the background model build: stage B0 did not run)"
echo
echo "=================================================================================================="
echo "=== summary (total ${SECONDS}s)"
"$PY" - "$STATUS" "$RECORDS" "$OUT/summary.txt" "$SECONDS" "$SMOKE" <<'PY'
import json, sys

status_file, records_file, summary_file, total, smoke = sys.argv[1:]
records = {}
for line in open(records_file):
    if line.strip():
        r = json.loads(line)
        records[r["tag"]] = r
out = [f"GPU check summary ({'SMOKE run: tiny models on the CPU' if smoke == '1' else 'H200'}; total {total} s). "
       "s/step: median over steps 3..N. Peaks (GiB, CUDA allocator): whole process / steps 2..N only.", ""]
head = (f"{'stage':<74} {'result':<11} {'wall s':>6} {'s/step':>7} {'peak alloc':>10} {'peak resv':>9} "
        f"{'steps alloc':>11} {'steps resv':>10}")
out += [head, "-" * len(head)]
for line in open(status_file):
    sid, desc, rc, dt = line.rstrip("\n").split("\t")
    r = records.get(sid)
    if rc == "skipped":
        result = "skipped"
    elif rc != "0":
        result = "timeout" if rc in ("124", "137") else f"FAILED({rc})"
    else:
        result = "ok" if r is None or r.get("ok", True) else "FAILED(chk)"
    f = lambda k, fmt="{:.2f}": fmt.format(r[k]) if r is not None and k in r else "-"  # noqa: E731
    name = f"{sid} {desc}"
    name = name if len(name) <= 74 else name[:71] + "..."
    out.append(f"{name:<74} {result:<11} {dt:>6} {f('s_per_step', '{:.3f}'):>7} {f('peak_allocated_gib'):>10} "
               f"{f('peak_reserved_gib'):>9} {f('steps_peak_allocated_gib'):>11} {f('steps_peak_reserved_gib'):>10}")
notes = []
for r in records.values():
    for c in r.get("checks", []):
        extra = {k: c[k] for k in ("kind", "lora_up_moved", "diffusers_lora_state_dict_keys", "changed_vs_base",
                                   "non_finite", "non_finite_keys", "error") if k in c and c[k] != []}
        notes.append(f"  {r['tag']} {c['file'].rsplit('/', 1)[-1]}: {'ok' if c.get('ok') else 'FAILED'} {extra}")
    if "step_times" in r:
        notes.append(f"  {r['tag']} step times, steps 2..N (s): {r['step_times']}")
    for k in ("step_error", "steps_peak_error", "sampler_error"):
        if k in r:
            notes.append(f"  {r['tag']} {k}: {r[k]}")
if notes:
    out += ["", "output checks and notes:"] + notes
text = "\n".join(out) + "\n"
print(text)
with open(summary_file, "w") as fh:
    fh.write(text)
PY
echo "=== done at +${SECONDS}s: log $LOG, summary $OUT/summary.txt, records $RECORDS"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
