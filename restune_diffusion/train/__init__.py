"""Text-to-image fine-tuning of SD v1.5 with attached tuners, over accelerate (multi-GPU, mixed precision, gradient
accumulation): `train_t2i.py` is `main`, the library call is `train(parse_args(argv))`.

A run is a list of tasks; a single run is K = 1, a joint run K bypasses trained in one backbone pass (joint.py). One
concept a file, in the order a run uses them:

    options.py      flags (diffusers' names) over the --config YAML over defaults, checked before anything loads
    joint.py        what only joint runs need: tasks from configs and sweeps, the shared backbone pass
    setup.py        accelerator, data, models with each task's tuners, the prepared modules
    optimizer.py    one AdamW, a param group and an LR schedule per task
    loss.py         the objective per task (the place a new loss term plugs in)
    loop.py         micro-steps, updates, log, checkpoint and validation schedules
    checkpoints.py  writing, completeness, `latest`, pruning
    resume.py       what a resume may change (APPLIED / REFUSED) and the resume itself
    validation.py   sample grids and the held-out loss
    outputs.py      the log, the resolved config, tuner files, curves, summary and model card per task
    run.py          the job top to bottom: train() and main()
"""

from restune_diffusion.train.checkpoints import STATE_FILE, DiskWriteError
from restune_diffusion.train.loop import NonFiniteLossError
from restune_diffusion.train.options import parse_args
from restune_diffusion.train.outputs import CONFIG_FILE, LOG_FILE, TUNERS_FILE, read_log
from restune_diffusion.train.run import close_process_group, main, train

__all__ = ["CONFIG_FILE", "LOG_FILE", "STATE_FILE", "TUNERS_FILE", "DiskWriteError", "NonFiniteLossError",
           "close_process_group", "main", "parse_args", "read_log", "train"]
