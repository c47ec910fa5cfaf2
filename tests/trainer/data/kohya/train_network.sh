# The basic LoRA command of kohya-ss/sd-scripts docs/train_network.md (section 3), as a user saves it.
accelerate launch --num_cpu_threads_per_process 1 train_network.py \
 --pretrained_model_name_or_path="<path to Stable Diffusion model>" \
 --dataset_config="my_dataset_config.toml" \
 --output_dir="<output directory for training results>" \
 --output_name="my_lora" \
 --save_model_as=safetensors \
 --network_module=networks.lora \
 --network_dim=16 \
 --network_alpha=1 \
 --learning_rate=1e-4 \
 --optimizer_type="AdamW8bit" \
 --lr_scheduler="constant" \
 --sdpa  \
 --max_train_epochs=10 \
 --save_every_n_epochs=1 \
 --mixed_precision="fp16" \
 --gradient_checkpointing \
 --network_args "conv_dim=4" "conv_alpha=1"
