#!/usr/bin/env python
"""Train a zoo model with LightningCLI, then test it.

    python train.py                                           # default recipe: configs/train/vmoe_digits.yaml
    python train.py --config configs/train/vmoe_mnist.yaml    # any recipe; override with --trainer.* --model.* --data.*
    python train.py --ckpt_path last                          # resume runs/<run_name>/checkpoints/last.ckpt
    python train.py --print_config                            # show the full resolved config

Writes runs/<run_name>/ (checkpoints/last.ckpt, metrics.csv, config.yaml, test_metrics.json, plots/) under
--trainer.default_root_dir (default: the working directory); the last stdout line is a JSON summary.
"""

from zoo.tasks.cli import main

if __name__ == "__main__":
    main()
