"""Fine-tune Stable Diffusion v1.5 with Res-Tuning (arXiv 2310.19859) or a classic tuner.

    python train_t2i.py                      # the tiny demo (configs/tiny_demo.yaml) on CPU, about two minutes
    accelerate launch train_t2i.py --config configs/res_tuning.yaml \\
        --pretrained_model_name_or_path /models/stable-diffusion-v1-5 --dataset coco2017 --data_dir /data/coco

    python train_t2i.py --config a.yaml --config b.yaml ...   # K bypasses in one backbone pass, one folder each

Flags keep diffusers' names (train_text_to_image_lora.py); `python train_t2i.py --help` lists them.
"""

from restune_diffusion.train import main

if __name__ == "__main__":
    raise SystemExit(main())
