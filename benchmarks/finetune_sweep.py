"""Fine-tuning settings side by side on one checkpoint: MNIST's first N train / M test images, one
finetune protocol per JSON argument (its keys; ``"_twin": true`` fine-tunes the random-init twin).
Results taken before ``feature_layer`` was a protocol key wrote it ``"_feature_layer"``, the same setting.

    python benchmarks/finetune_sweep.py runs/mae-vit 10000 2000 '{"steps": 150, "batch_size": 128}' \
        '{"steps": 150, "batch_size": 128, "optimizer": "sgd", "base_lr": 0.4, "grad_clip": 1.0}'

Prints one JSON line per setting (top-1 on the M test images, mean training loss of the last tenth,
seconds). Results: benchmarks/results/finetune_families.md.
"""

import json
import os
import sys
import time

import torch

from bigmodel import api
from bigmodel.data import base as data_base
from bigmodel.registry import DATASETS, PROTOCOLS
from bigmodel.train import build

torch.set_num_threads(2)
run, ntr, nte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mnist = os.path.join(os.environ.get("BIGMODEL_DATA", "../shared/data"), "mnist.npz")
net, found, recipe = api.load_backbone(run)
twin = build.random_twin(recipe, pretrained=net)  # with the checkpoint's fitted palette (iGPT, LSTM)
tr = data_base.materialize(DATASETS.build("npz", split="train", path=mnist, limit=ntr))
te = data_base.materialize(DATASETS.build("npz", split="test", path=mnist, limit=nte))
for cfg in sys.argv[4:]:
    cfg = json.loads(cfg)
    which = cfg.pop("_twin", False)
    t = time.perf_counter()
    ft = PROTOCOLS.build("finetune", **cfg)  # validated as a recipe's keys are
    r = ft.run(twin if which else net, tr, te)
    shown = {"twin": which, **cfg}
    print(json.dumps({**shown, "top1": round(r["top1"], 2), "loss": round(r["train_loss"], 3),
                      "s": round(time.perf_counter() - t)}), flush=True)
