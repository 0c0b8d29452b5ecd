"""What train_t2i.py says to a flag it does not take: one line naming our equivalent, or why the flag does not apply
here, instead of argparse's usage block (issue 17). The flags are those of diffusers' train_text_to_image(_lora).py /
train_dreambooth_lora.py and kohya's sd-scripts (train_network.py and library/train_util.py) that users bring. The few
of diffusers' README commands that change nothing here (--push_to_hub, --hub_model_id, ...) are named in one line and
dropped, so those commands run as they are.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

D, K, DK = "diffusers", "kohya sd-scripts", "diffusers/kohya"
_LORA_YAML = "the YAML's tuners: list (configs/lora.yaml: `- {type: lora, rank: 4, alpha: 4}`)"
_UPLOAD = ("nothing is uploaded from here (offline): the output folder holds the weights and a model card README.md; "
           "upload it yourself (`huggingface-cli upload REPO OUTPUT_DIR`)")
_TEXT_ENCODER = "the text encoder stays frozen here: only UNet tuners train"
_CYCLES = ("not taken: cosine_with_restarts runs diffusers' default 1 cycle and polynomial its power 1.0; pick another "
           "--lr_scheduler")
_EMA_SMALL = "--use_ema averages only the tuner weights (a few million fp32 values on the training device)"
_PRIOR = ("kohya's regularization images are our class images: --with_prior_preservation --class_data_dir DIR "
          "--class_prompt PROMPT (the missing ones are drawn by the base; --prior_loss_weight as kohya's)")
_NOISE = "not implemented; --noise_offset is (diffusers' offset noise)"
_NO_UPSCALE = ("not taken: with --enable_bucket every image is resized, up or down, to cover the bucket nearest its "
               "aspect ratio (kohya without the flag)")

# flags of diffusers' README commands that change nothing we do: said in one line and dropped, so the command runs
# (flag -> (how many values it takes, why it does not apply))
IGNORED: dict[str, tuple[int, str]] = {
    "--push_to_hub": (0, _UPLOAD),
    "--hub_model_id": (1, _UPLOAD),
    "--hub_token": (1, _UPLOAD),
    "--logging_dir": (1, "tracker logs go to OUTPUT_DIR/logs, the loss per step to OUTPUT_DIR/train_log.jsonl"),
    "--local_rank": (1, "the process rank comes from the launcher (torchrun, accelerate launch: LOCAL_RANK)"),
}

# flag -> (whose, what to do here)
FOREIGN: dict[str, tuple[str, str]] = {
    # diffusers train_text_to_image(_lora).py, train_dreambooth_lora.py
    "--rank": (D, f"set `rank:` of the lora tuner in {_LORA_YAML}"),
    "--lora_alpha": (D, f"set `alpha:` of the lora tuner in {_LORA_YAML}"),
    "--lora_dropout": (D, "LoRA dropout is not implemented"),
    "--use_dora": (D, "DoRA is a tuner type: `- {type: dora, rank: 4}` in the YAML's tuners: list (configs/dora.yaml)"),
    "--lr_num_cycles": (D, _CYCLES),
    "--lr_power": (D, _CYCLES),
    "--cache_dir": (D, "models are read offline from the Hugging Face cache: set HF_HUB_CACHE=DIR (or HF_HOME)"),
    "--tracker_project_name": (D, "the tracker project is 'restune-diffusion' (set WANDB_PROJECT for wandb)"),
    "--non_ema_revision": (D, f"{_EMA_SMALL}; the base loads from --revision"),
    "--offload_ema": (D, f"nothing to offload: {_EMA_SMALL}"),
    "--foreach_ema": (D, f"not needed: {_EMA_SMALL}"),
    "--input_perturbation": (D, _NOISE),
    "--dream_training": (D, "DREAM training is not implemented"),
    "--train_text_encoder": (D, _TEXT_ENCODER),
    "--text_encoder_lr": (DK, _TEXT_ENCODER),
    "--pretrained_vae_model_name_or_path": (D, "the VAE comes from --pretrained_model_name_or_path"),
    "--optimizer": (D, "AdamW is the optimizer (bitsandbytes' 8-bit AdamW with --use_8bit_adam)"),
    "--instance_prompt": (D, "captions come with the images (metadata.jsonl, or a .txt beside each image); or put the "
                             "images in a folder named 1_<prompt> (kohya's layout): the prompt is their caption"),
    "--loss_type": (DK, "the loss is the MSE (L2), min-SNR weighted with --snr_gamma"),
    # kohya sd-scripts
    "--network_module": (K, "pick the tuner with `type:` in the YAML's tuners: list (lora, dora, loha, lokr, oft, "
                            "res_adapter, bypass, ...)"),
    "--network_dim": (K, f"set `rank:` of the lora tuner (`dim:` of an adapter) in {_LORA_YAML}"),
    "--network_alpha": (K, f"set `alpha:` of the lora tuner in {_LORA_YAML}"),
    "--network_args": (K, "tuner options are fields of its YAML entry (targets:, blocks:, ...)"),
    "--network_dropout": (K, "LoRA dropout is not implemented"),
    "--network_weights": (K, "continue a run with --resume_from_checkpoint; load finished weights with "
                             "restune_diffusion.load_tuners"),
    "--network_train_unet_only": (K, "always the case here: drop the flag"),
    "--network_train_text_encoder_only": (K, _TEXT_ENCODER),
    "--unet_lr": (K, "--learning_rate"),
    "--dim_from_weights": (K, "a tuner file's header carries its config: load_tuners rebuilds it"),
    "--output_name": (K, "the files have fixed names in --output_dir (tuners.safetensors; a LoRA also as "
                         "pytorch_lora_weights.safetensors)"),
    "--save_model_as": (K, "weights are saved as safetensors only"),
    "--save_precision": (K, "tuner weights are saved in fp32 (they train in fp32)"),
    "--save_every_n_steps": (K, "--checkpointing_steps"),
    "--save_every_n_epochs": (K, "--checkpointing_steps (in optimizer steps)"),
    "--save_last_n_steps": (K, "--checkpoints_total_limit"),
    "--save_last_n_epochs": (K, "--checkpoints_total_limit"),
    "--save_state": (K, "checkpoints always hold the full training state (--checkpointing_steps)"),
    "--max_train_epochs": (K, "--num_train_epochs"),
    "--max_data_loader_n_workers": (K, "--dataloader_num_workers"),
    "--persistent_data_loader_workers": (K, "not taken: workers restart each epoch to get that epoch's data order"),
    "--xformers": (K, "--enable_xformers_memory_efficient_attention"),
    "--sdpa": (K, "PyTorch SDPA is the default attention: drop the flag"),
    "--mem_eff_attn": (K, "PyTorch SDPA (memory-efficient) is the default attention: drop the flag"),
    "--optimizer_type": (K, "AdamW is the optimizer (bitsandbytes' 8-bit AdamW with --use_8bit_adam)"),
    "--optimizer_args": (K, "--adam_beta1, --adam_beta2, --adam_weight_decay, --adam_epsilon"),
    "--lr_scheduler_num_cycles": (K, _CYCLES),
    "--lr_scheduler_power": (K, _CYCLES),
    "--min_snr_gamma": (K, "--snr_gamma"),
    "--log_with": (K, "--report_to (tensorboard, wandb, all, none)"),
    "--wandb_api_key": (K, "set WANDB_API_KEY in the environment (or WANDB_MODE=offline)"),
    "--wandb_run_name": (K, "set WANDB_NAME in the environment"),
    "--sample_every_n_steps": (K, "--validation_steps"),
    "--sample_every_n_epochs": (K, "--validation_epochs"),
    "--sample_prompts": (K, "--validation_prompt (repeat it for several)"),
    "--sample_sampler": (K, "validation images use DDIM; generate.py --scheduler takes 'Euler a', 'DPM++ 2M', ..."),
    "--validate_every_n_steps": (K, "--validation_steps (the held-out loss is computed with each validation)"),
    "--validate_every_n_epochs": (K, "--validation_epochs"),
    "--max_validation_steps": (K, "the whole held-out split (--validation_split) is scored at each validation"),
    "--full_fp16": (K, "--mixed_precision fp16 (frozen weights in fp16, trainables in fp32)"),
    "--full_bf16": (K, "--mixed_precision bf16 (frozen weights in bf16, trainables in fp32)"),
    "--fp8_base": (K, "fp8 base weights are not supported: --mixed_precision fp16/bf16"),
    "--v2": (K, "Stable Diffusion 2.x checkpoints are not supported (SD v1.5 layout)"),
    "--v_parameterization": (K, "--prediction_type v_prediction"),
    "--clip_skip": (K, "not taken: the text encoder's last layer is used, as SD v1.5 was trained"),
    "--max_token_length": (K, "captions are cut at CLIP's 77 tokens"),
    "--flip_aug": (K, "--random_flip"),
    "--random_crop": (K, "random crop is what you get without --center_crop"),
    "--cache_latents_to_disk": (K, "--cache_latents"),
    "--bucket_no_upscale": (K, _NO_UPSCALE),
    "--reg_data_dir": (K, _PRIOR),
    "--multires_noise_iterations": (K, _NOISE),
    "--adaptive_noise_scale": (K, _NOISE),
    "--ip_noise_gamma": (K, _NOISE),
    "--zero_terminal_snr": (K, "zero-terminal-SNR rescaling is not implemented"),
    "--min_timestep": (K, "timesteps are drawn from the whole schedule"),
    "--max_timestep": (K, "timesteps are drawn from the whole schedule"),
    "--debiased_estimation_loss": (K, "not implemented; --snr_gamma (min-SNR) is the loss weighting offered"),
    "--scale_v_pred_loss_like_noise_pred": (K, "not implemented; --snr_gamma weights v-prediction correctly"),
    "--masked_loss": (K, "masked loss is not implemented"),
    "--weighted_captions": (K, "weighted captions are not implemented"),
    "--scale_weight_norms": (K, "not implemented; --max_grad_norm clips the gradients"),
    "--no_half_vae": (K, "validation images are decoded in fp32 already"),
    "--lowram": (K, "not needed: drop the flag"),
    "--highvram": (K, "not needed: drop the flag"),
    "--deepspeed": (K, "set DeepSpeed up with `accelerate config` and start with `accelerate launch` (untested here)"),
    "--config_file": (K, "--config takes a YAML (tuners:, train:, data:); OUTPUT_DIR/train_config.yaml repeats a run"),
    "--output_config": (K, "every run writes OUTPUT_DIR/train_config.yaml (`--config` on it repeats the run)"),
    "--dataset_config": (K, "data options are flags or the YAML's data: section"),
    "--training_comment": (K, "not taken: the model card README.md records the run"),
    "--metadata_title": (K, "the model card README.md and the tuner file's header record the run"),
    "--huggingface_repo_id": (K, _UPLOAD),
    "--huggingface_token": (K, _UPLOAD),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are ValueErrors (one line through cli.run_cli) instead of a usage block and exit."""

    def error(self, message: str):
        raise ValueError(f"{message} (`{self.prog} --help` lists the flags)")


def drop_ignored(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without the IGNORED flags and their values, one line per flag saying why it changes nothing here)."""
    kept, notes, skip = [], [], 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        flag, has_value = token.split("=", 1)[0], "=" in token
        if flag in IGNORED:
            count, why = IGNORED[flag]
            skip = 0 if has_value else count
            notes.append(f"{flag}: ignored, {why}")  # never the value: --hub_token is a secret
            continue
        kept.append(token)
    return kept, notes


def check_flags(argv: Sequence[str], ours: Sequence[str], prog: str = "train_t2i.py") -> tuple[list[str], list[str]]:
    """A flag of diffusers' or kohya's scripts that we do not take: one line naming our equivalent or why it does not
    apply; any other unknown flag: one line with the closest flags we do take (`ours`). Returns drop_ignored(argv)."""
    argv, notes = drop_ignored(argv)
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        if flag in ours:
            continue
        if flag in FOREIGN:
            whose, what = FOREIGN[flag]
            raise ValueError(f"{flag} is a {whose} flag that train_t2i.py does not take: {what}")
        if not any(o.startswith(flag) for o in ours):  # argparse takes unique prefixes (e.g. --resume)
            close = difflib.get_close_matches(flag, ours, n=2, cutoff=0.7)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown flag {flag}{hint} (`{prog} --help` lists the flags)")
    return argv, notes
