r"""The paper's SD v1.5 table (arXiv 2310.19859, COCO2017) in one command: train every row, evaluate them all and the
untuned base on the same captions and seeds, write table.md (ours beside the paper's numbers), table.json, table.png.

    python reproduce_table.py --pretrained_model_name_or_path /models/stable-diffusion-v1-5 \
        --dataset coco2017 --data_dir /data/coco --coco_dir /data/coco --output_dir out/table \
        --max_train_steps 20000 --train_batch_size 8 --mixed_precision fp16 --checkpointing_steps 1000 \
        --inception_weights pt_inception-2015-12-05-6726825d.pth --clip_model clip-vit-large-patch14/
    accelerate launch reproduce_table.py ...              # N processes (CPU: torchrun --nproc_per_node N)
    python reproduce_table.py ... --rows base lora res_tuning my_tuner.yaml   # some rows, or your own

Every flag not listed by --help goes to train_t2i.py, the same for every row. Rerun the same command after an
interruption: finished rows are kept, the others resume from their latest checkpoint, images on disk are reused.
Errors are one line (exit 2); RESTUNE_DEBUG=1 shows the traceback.
"""

from restune_diffusion.cli import run_cli
from restune_diffusion.table import main
from restune_diffusion.train import DiskWriteError, NonFiniteLossError

if __name__ == "__main__":
    raise SystemExit(run_cli(main, "reproduce_table.py", extra_errors=(NonFiniteLossError, DiskWriteError)))
