#!/usr/bin/env bash
# Fresh-machine quickstart: set up .venv, then train a LoRA on a bundled tiny model and synthetic images.
# Also shows the checkpoint round trip (WebUI single file -> diffusers -> single file, checked bit for bit).
# Everything is written to quickstart_output/.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
py=.venv/bin/python
out=quickstart_output
rm -rf "$out" && mkdir -p "$out"

# 1. A tiny SD 1.x model (random weights, real block structure) and 8 synthetic captioned images.
$py tools/make_tiny_model.py --family sd1 "$out/tiny_sd1.safetensors"
$py tools/make_synthetic_dataset.py "$out/train_data" --images 8 --size 64

printf 'sks shape, red circle --d 1 --s 20\nsks shape, blue square --n blurry --d 2 --s 20 --ss euler_a\n' > "$out/prompts.txt"

# 2. Train a LoRA (kohya flags; on a GPU machine use `accelerate launch train_network.py ...`).
$py train_network.py \
  --pretrained_model_name_or_path "$out/tiny_sd1.safetensors" --train_data_dir "$out/train_data" \
  --output_dir "$out/lora" --output_name tiny_lora --resolution 64 --enable_bucket --min_bucket_reso 32 \
  --max_bucket_reso 128 --bucket_reso_steps 32 --network_dim 4 --network_alpha 2 --learning_rate 1e-3 \
  --max_train_steps 30 --train_batch_size 2 --cache_latents --seed 42 --save_every_n_steps 10 \
  --logging_dir "$out/logs" --max_data_loader_n_workers 0 \
  --sample_prompts "$out/prompts.txt" --sample_every_n_steps 10 --sample_at_first
$py tools/show_metadata.py --model "$out/lora/tiny_lora.safetensors"

# 3. Checkpoint conversion round trip.
$py tools/convert_diffusers20_original_sd.py "$out/tiny_sd1.safetensors" "$out/tiny_sd1_diffusers" --use_safetensors
$py tools/convert_diffusers20_original_sd.py "$out/tiny_sd1_diffusers" "$out/tiny_sd1_roundtrip.safetensors"
$py tools/compare_models.py "$out/tiny_sd1.safetensors" "$out/tiny_sd1_roundtrip.safetensors"

echo
echo "Done. In $out/:"
echo "  lora/tiny_lora.safetensors            the trained LoRA (kohya format: loads in WebUI, ComfyUI, diffusers)"
echo "  lora/tiny_lora-step000000{10,20}.*    periodic saves"
echo "  lora/sample/*.png                     sample images at steps 0, 10, 20, 30 (WebUI PNG Info reads them)"
echo "  logs/                                 TensorBoard logs: loss, lr, samples (tensorboard --logdir $out/logs)"
echo "  tiny_sd1_diffusers/, tiny_sd1_roundtrip.safetensors   the conversion round trip"
