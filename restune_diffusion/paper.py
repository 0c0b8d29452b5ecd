"""The numbers the paper reports, for the table and the benchmarks to put beside ours."""

# The paper's SD v1.5 / COCO2017 table (arXiv 2310.19859): FID, trainable params (M), training memory (GB),
# hours per epoch. The one copy: table.py and the benches read it.
PAPER = {
    "base": {"fid": 15.48, "params_m": None, "memory_gb": None, "hours_per_epoch": None},
    "full": {"fid": 14.85, "params_m": 862.0, "memory_gb": 72.77, "hours_per_epoch": 1.98},
    "lora": {"fid": 14.50, "params_m": 9.96, "memory_gb": 61.03, "hours_per_epoch": 1.42},
    "adapter": {"fid": 14.73, "params_m": 2.51, "memory_gb": 54.30, "hours_per_epoch": 1.30},
    "prefix": {"fid": 15.36, "params_m": 4.99, "memory_gb": 64.91, "hours_per_epoch": 2.20},
    "prompt": {"fid": 14.90, "params_m": 1.25, "memory_gb": 63.70, "hours_per_epoch": 2.17},
    "res_tuning": {"fid": 13.96, "params_m": 2.54, "memory_gb": 54.49, "hours_per_epoch": 1.38},
    "res_tuning_bypass": {"fid": 14.89, "params_m": 3.76, "memory_gb": 21.35, "hours_per_epoch": 0.82},
}
PAPER_SOURCE = "arXiv 2310.19859 (Res-Tuning), Stable Diffusion v1.5 fine-tuned on COCO2017"
# the paper's names of its rows
LABELS = {"base": "SD v1.5", "full": "Full", "lora": "LoRA", "adapter": "Adapter", "prefix": "Prefix",
          "prompt": "Prompt", "res_tuning": "Res-Tuning", "res_tuning_bypass": "Res-Tuning-Bypass"}
