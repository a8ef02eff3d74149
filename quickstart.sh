#!/usr/bin/env bash
# Fresh-machine quickstart: set up .venv, then run the main job on a bundled tiny model.
# Today's main job is a checkpoint conversion round trip (WebUI single file -> diffusers folder -> single file),
# checked bit for bit. Outputs go to quickstart_output/.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
py=.venv/bin/python
out=quickstart_output
rm -rf "$out" && mkdir -p "$out"
$py tools/make_tiny_model.py --family sd1 "$out/tiny_sd1.safetensors"
$py tools/convert_diffusers20_original_sd.py "$out/tiny_sd1.safetensors" "$out/tiny_sd1_diffusers" --use_safetensors
$py tools/convert_diffusers20_original_sd.py "$out/tiny_sd1_diffusers" "$out/tiny_sd1_roundtrip.safetensors"
$py tools/compare_models.py "$out/tiny_sd1.safetensors" "$out/tiny_sd1_roundtrip.safetensors"
$py tools/show_metadata.py --model "$out/tiny_sd1_roundtrip.safetensors"
echo "Done. Outputs in $out/: tiny_sd1.safetensors (WebUI layout), tiny_sd1_diffusers/ (diffusers), tiny_sd1_roundtrip.safetensors"
