#!/usr/bin/env python
"""Evaluate a train.py checkpoint: accuracy, loss and per-layer routing as ONE JSON object on the last stdout line,
plus PNG plots (expert utilisation per MoE layer, class-by-expert routing matrices).

    python eval.py                                   # the default run: runs/vmoe_digits/checkpoints/last.ckpt
    python eval.py --checkpoint PATH --split val --eval-capacity-factor 2.0 --eval-top-k 1 --output metrics.json
    python eval.py --model vmoe_small_mnist --pretrained           # published weights: recorded accuracy re-checked
    python eval.py --model vmoe_small_mnist --pretrained --fewshot # few-shot linear evaluation (zoo/tasks/fewshot.py)
"""

from zoo.tasks.evaluate import main

if __name__ == "__main__":
    main()
