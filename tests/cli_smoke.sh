#!/usr/bin/env bash
# The `sdt` command as a user meets it: help, inspect on good and bad files, train's configuration
# resolution and its errors. Each check fails the test with the command's output.
set -uo pipefail
sdt="$1"; src="$2"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
failures=0
check() {  # check "description" expected-exit-code grep-pattern -- command...
  local what="$1" want="$2" pattern="$3"; shift 4
  local out rc
  out="$("$@" 2>&1)"; rc=$?
  if [ "$rc" != "$want" ] || ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL: $what (exit $rc, wanted $want; pattern '$pattern')"; echo "$out" | head -20; failures=$((failures+1))
  else
    echo "ok: $what"
  fi
}

check "top-level help lists the subcommands" 0 "inspect" -- "$sdt" --help
check "--version names sdt and its commit" 0 "^sdt [0-9]+\.[0-9]+\.[0-9]+ \(commit " -- "$sdt" --version
check "--version names LibTorch, MPI and HDF5" 0 "LibTorch [0-9].*" -- "$sdt" --version
check "train help lists kohya arguments" 0 "--network_dim" -- "$sdt" train --help
check "inspect prints tensors, totals and metadata" 0 "17 tensors.*bytes" -- "$sdt" inspect "$src/tests/fixtures/safetensors/python_all_dtypes.safetensors"
check "inspect prints dtype and shape" 0 "t_BF16	BF16	\[3, 5\]" -- "$sdt" inspect "$src/tests/fixtures/safetensors/python_all_dtypes.safetensors"
check "inspect prints the metadata" 0 "\"ss_network_dim\": \"4\"" -- "$sdt" inspect "$src/tests/fixtures/safetensors/python_all_dtypes.safetensors"
head -c 100 "$src/tests/fixtures/safetensors/python_all_dtypes.safetensors" > "$work/truncated.safetensors"
check "inspect of a truncated file fails with the reason" 1 "truncated.safetensors: header length .* runs past the end" -- "$sdt" inspect "$work/truncated.safetensors"
check "inspect of a missing file fails" 1 "nope.safetensors: cannot open" -- "$sdt" inspect "$work/nope.safetensors"

check "output_config prints the resolved configuration" 0 "^learning_rate = 0.0003$" -- \
  "$sdt" train --config_file "$src/configs/sd15_lora_example.toml" --learning_rate 3e-4 --output_config
check "output_config keeps file values" 0 "^network_dim = 16$" -- \
  "$sdt" train --config_file "$src/configs/sd15_lora_example.toml" --output_config
check "output_config to a new file writes it" 0 "wrote the configuration" -- \
  "$sdt" train --config_file "$work/new.toml" --network_dim 8 --output_config
check "the written file holds the arguments" 0 "^network_dim = 8$" -- cat "$work/new.toml"
printf '[training]\nmax_train_step = 10\n' > "$work/typo.toml"
check "a typo in the config names file, line, key and suggestion" 1 "typo.toml:2: key 'max_train_step' in \[training\].*did you mean 'max_train_steps'" -- \
  "$sdt" train --config_file "$work/typo.toml"
printf '[general]\nflip_aug = "yes"\n[[datasets]]\nresolution = 512\n' > "$work/ds.toml"
check "a wrong type in the dataset config names file, line and key" 1 "ds.toml:2: \[general\]: key 'flip_aug'.*expected true/false" -- \
  "$sdt" inspect dataset --dataset_config "$work/ds.toml"
check "train without a network module points to train_db" 1 "required: .* or train the whole model with .sdt train_db." -- \
  "$sdt" train --dataset_config "$src/configs/dataset_example.toml"
check "train_db refuses pickled checkpoints" 1 "save_model_as.*safetensors only" -- \
  "$sdt" train_db --pretrained_model_name_or_path x --output_dir "$work" --save_model_as ckpt
check "log_level is accepted as console_log_level" 1 "not one of: DEBUG" -- "$sdt" train --log_level verbose
lora=(--network_module networks.lora --pretrained_model_name_or_path "$src/tests/fixtures/sd/sd1" --output_dir "$work/bad")
check "--network_dim 0 is named" 1 "network_dim: must be at least 1, got 0" -- "$sdt" train "${lora[@]}" --network_dim 0
check "--max_train_steps -5 is named" 1 "max_train_steps: must be at least 1, got -5" -- "$sdt" train "${lora[@]}" --max_train_steps -5
check "--train_batch_size 0 is named" 1 "train_batch_size: must be at least 1, got 0" -- "$sdt" train "${lora[@]}" --train_batch_size 0
check "unet-only with text-encoder-only is refused" 1 "leave nothing to train" -- \
  "$sdt" train "${lora[@]}" --network_train_unet_only --network_train_text_encoder_only
check "--blocks_to_swap -1 is named" 1 "blocks_to_swap: must be 0 or more" -- "$sdt" train "${lora[@]}" --blocks_to_swap -1

mkdir -p "$work/ds/5_sks"
for f in plain.png lossless.webp plain.bmp exif_rotate6.jpg; do cp "$src/tests/fixtures/data/images/$f" "$work/ds/5_sks/"; done
echo "sks, red, green" > "$work/ds/5_sks/plain.txt"
printf '[general]\nenable_bucket = true\nmin_bucket_reso = 16\nmax_bucket_reso = 64\nbucket_reso_steps = 8\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 32\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = "%s"\n  class_tokens = "sks"\n  num_repeats = 5\n' "$work/ds/5_sks" > "$work/ds.toml"
check "inspect dataset prints buckets and steps per epoch" 0 "world size 3: .* [0-9]+ steps per epoch" -- \
  "$sdt" inspect dataset --dataset_config "$work/ds.toml" --world_size 3
check "inspect dataset dumps processed images" 0 "wrote 2 processed images" -- \
  "$sdt" inspect dataset --dataset_config "$work/ds.toml" --dump 2 --dump_dir "$work/dump"
check "the dumped images are PNG files" 0 "P +N +G" -- bash -c "head -c 8 \"\$(ls -d $work/dump/*.png | head -1)\" | od -c"
echo "sks" > "$work/ds/5_sks/broken.png"
check "a corrupt image in the dataset is named" 1 "broken.png" -- "$sdt" inspect dataset --dataset_config "$work/ds.toml"
rm "$work/ds/5_sks/broken.png"
check "--resolution -32 is named" 1 "resolution: expected positive sizes, got \"-32\"" -- \
  "$sdt" train "${lora[@]}" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer" --train_data_dir "$work/ds" --resolution -32

check "a min_bucket_reso below bucket_reso_steps is named" 1 "min_bucket_reso: 16 is smaller than bucket_reso_steps 64" -- \
  "$sdt" train "${lora[@]}" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer" --train_data_dir "$work/ds" --resolution 32 \
  --enable_bucket --min_bucket_reso 16

# kohya's SDXL script names: the same training on the SDXL family, a few steps on the tiny SDXL model.
sdxl=(--pretrained_model_name_or_path "$src/tests/fixtures/sdxl/sdxl_a" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer"
      --train_data_dir "$work/ds" --resolution 32 --enable_bucket --min_bucket_reso 32 --max_bucket_reso 64
      --bucket_reso_steps 32 --max_train_steps 2 --console_log_level WARNING)
check "sdxl_train_network trains an SDXL LoRA" 0 "" -- "$sdt" sdxl_train_network "${sdxl[@]}" --network_module networks.lora \
  --output_dir "$work/sdxl_lora" --output_name lora
check "the LoRA has kohya's SDXL names" 0 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" -- \
  "$sdt" inspect "$work/sdxl_lora/lora.safetensors"
check "cache-te encodes SDXL's three text-encoder outputs" 0 "" -- "$sdt" cache-te "${sdxl[@]}" --cache_dir "$work/sdxl_cache"
check "cache-latents encodes SDXL latents" 0 "" -- "$sdt" cache-latents "${sdxl[@]}" --cache_dir "$work/sdxl_cache"
check "the caches hold SDXL's entries" 0 "hidden_state2" -- bash -c "h5dump -H $work/sdxl_cache/*text*.h5 2>/dev/null || h5ls -r $work/sdxl_cache/*text*.h5"
check "sample draws an SDXL image as kohya's SDXL pipeline" 0 "wrote .*sdxl.png" -- "$sdt" sample \
  --pretrained_model_name_or_path "$src/tests/fixtures/sdxl/sdxl_a" --tokenizer_vocab "$src/tests/fixtures/sd/sampling/tokenizer" \
  --prompt "a red square" --steps 2 --seed 3 --width 64 --height 72 --output "$work/sdxl.png"
check "the SDXL image is a 64x72 PNG (IHDR width, height)" 0 "^ +0 +0 +0 +64 +0 +0 +0 +72$" -- od -An -tu1 -j16 -N8 "$work/sdxl.png"
check "sdxl_train refuses train_db's text-encoder flags" 1 "stop_text_encoder_training: is train_db.py's" -- \
  "$sdt" sdxl_train "${sdxl[@]}" --output_dir "$work/sdxl_full" --stop_text_encoder_training 5
check "sdxl_train_network on an SD 1.x model is refused" 1 "not an SDXL diffusers folder" -- \
  "$sdt" sdxl_train_network --pretrained_model_name_or_path "$src/tests/fixtures/sd/sd1" --network_module networks.lora \
  --output_dir "$work/wrong" --train_data_dir "$work/ds" --resolution 32

# kohya's FLUX script names on the tiny FLUX.1 dev model: the transformer file, and CLIP-L, T5 and the autoencoder beside.
flux_model=(--pretrained_model_name_or_path "$src/tests/fixtures/flux/tiny/transformer.safetensors"
            --clip_l "$src/tests/fixtures/sd/sd1/text_encoder" --t5xxl "$src/tests/fixtures/flux/tiny/t5"
            --ae "$src/tests/fixtures/flux/tiny/ae" --t5xxl_max_token_length 16)
flux=("${flux_model[@]}" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer" --train_data_dir "$work/ds" --resolution 32
      --enable_bucket --min_bucket_reso 32 --max_bucket_reso 64 --bucket_reso_steps 32 --max_train_steps 2
      --console_log_level WARNING)
check "flux_train_network trains a FLUX LoRA with block swap" 0 "" -- "$sdt" flux_train_network "${flux[@]}" \
  --network_module networks.lora_flux --network_args train_t5xxl=True --blocks_to_swap 2 --output_dir "$work/flux_lora" --output_name lora
check "kohya's README FLUX LoRA command (bf16, fp8 base, 8-bit AdamW, cached latents and T5) runs as given" 0 "saved" -- \
  "$sdt" flux_train_network "${flux[@]}" --cache_latents_to_disk --save_model_as safetensors --sdpa \
  --persistent_data_loader_workers --max_data_loader_n_workers 2 --seed 42 --gradient_checkpointing --mixed_precision bf16 \
  --save_precision bf16 --network_module networks.lora_flux --network_dim 4 --network_train_unet_only \
  --optimizer_type adamw8bit --learning_rate 1e-4 --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk \
  --fp8_base --highvram --save_every_n_epochs 1 --timestep_sampling shift --discrete_flow_shift 3.1582 \
  --model_prediction_type raw --guidance_scale 1.0 --output_dir "$work/flux_readme" --output_name flux-lora-name \
  --console_log_level INFO
check "the LoRA has kohya's lora_flux names" 0 "lora_unet_single_blocks_0_linear1.lora_down.weight" -- \
  "$sdt" inspect "$work/flux_lora/lora.safetensors"
check "cache-te encodes FLUX's text-encoder outputs" 0 "" -- "$sdt" cache-te "${flux[@]}" --cache_dir "$work/flux_cache"
check "the cache holds T5's outputs and mask" 0 "t5_attn_mask" -- bash -c "h5dump -H $work/flux_cache/*text*.h5 2>/dev/null || h5ls -r $work/flux_cache/*text*.h5"
check "sample draws a FLUX image with kohya's sampler" 0 "wrote .*flux.png" -- "$sdt" sample "${flux_model[@]}" \
  --tokenizer_vocab "$src/tests/fixtures/sd/sampling/tokenizer" --prompt "a red square" --steps 2 --seed 3 --width 64 \
  --height 80 --output "$work/flux.png"
check "the FLUX image is a 64x80 PNG (IHDR width, height)" 0 "^ +0 +0 +0 +64 +0 +0 +0 +80$" -- od -An -tu1 -j16 -N8 "$work/flux.png"
check "sample with --blocks_to_swap 2 (forward-only swap) draws the same FLUX image" 0 "" -- bash -c "\"$sdt\" sample \
  ${flux_model[*]} --tokenizer_vocab $src/tests/fixtures/sd/sampling/tokenizer --prompt 'a red square' --steps 2 --seed 3 \
  --width 64 --height 80 --blocks_to_swap 2 --output $work/flux_swapped.png && cmp $work/flux.png $work/flux_swapped.png"
check "sample with --blocks_to_swap on SD is refused as kohya refuses it" 1 "blocks_to_swap" -- "$sdt" sample \
  --pretrained_model_name_or_path "$src/tests/fixtures/sd/sd1" --tokenizer_vocab "$src/tests/fixtures/sd/sampling/tokenizer" \
  --prompt x --blocks_to_swap 2 --output "$work/x.png"
check "merge-lora merges a FLUX LoRA into the transformer" 0 "" -- "$sdt" merge-lora --sd_model \
  "$src/tests/fixtures/flux/tiny/transformer.safetensors" --models "$work/flux_lora/lora.safetensors" --ratios 0.8 \
  --save_to "$work/flux_merged.safetensors" "${flux_model[@]:2}" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer"
check "the merged transformer keeps BFL's names" 0 "double_blocks.0.img_attn.qkv.weight" -- "$sdt" inspect "$work/flux_merged.safetensors"
check "merge-lora names the text encoders it merged but does not write" 0 "give --t5xxl_save_to" -- "$sdt" merge-lora --sd_model \
  "$src/tests/fixtures/flux/tiny/transformer.safetensors" --models "$work/flux_lora/lora.safetensors" --ratios 0.8 \
  --save_to "$work/flux_merged2.safetensors" "${flux_model[@]:2}" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer"
check "merge-lora writes T5 with its LoRA merged (--t5xxl_save_to)" 0 "" -- "$sdt" merge-lora --sd_model \
  "$src/tests/fixtures/flux/tiny/transformer.safetensors" --models "$work/flux_lora/lora.safetensors" --ratios 0.8 \
  --save_to "$work/flux_merged3.safetensors" --t5xxl_save_to "$work/t5_merged.safetensors" "${flux_model[@]:2}" \
  --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer"
check "the merged T5 has transformers' names" 0 "encoder.block.0.layer.0.SelfAttention.q.weight" -- "$sdt" inspect "$work/t5_merged.safetensors"
check "convert-flux-lora writes ai-toolkit's layout" 0 "saved" -- "$sdt" convert-flux-lora --src sd-scripts --dst ai-toolkit \
  --src_path "$work/flux_lora/lora.safetensors" --dst_path "$work/flux_lora_ait.safetensors"
check "the converted LoRA has diffusers' names" 0 "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" -- \
  "$sdt" inspect "$work/flux_lora_ait.safetensors"
check "flux_train_network without --t5xxl is refused as in kohya" 1 "t5xxl: required" -- \
  "$sdt" flux_train_network "${flux[@]:0:4}" "${flux[@]:6}" --network_module networks.lora_flux --output_dir "$work/wrong"

echo "$failures failure(s)"
[ "$failures" = 0 ]
