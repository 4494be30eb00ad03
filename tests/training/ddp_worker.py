"""Run by test_ddp.py under torchrun: a few DDP steps on the CPU (gloo), then each rank saves
the weights it holds. With "collapse": a dense PGD-AT run whose validation collapses in epoch 2 on
rank 0 only; each rank also saves the history it went through."""
import itertools
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import advmoe
from training import trainer
from training.config import resolve

out, data = sys.argv[1], sys.argv[2]
collapse = sys.argv[3:] == ["collapse"]
settings = dict(model="moe_resnet18", method="advmoe", epochs=1)
if collapse:
    settings = dict(model="resnet18", method="pgd-at", epochs=2, collapse_guard="rollback")
    # Each rank validates with its own BatchNorm statistics; here they disagree on purpose.
    scores = itertools.chain([0.6, 0.3] if os.environ["RANK"] == "0" else [0.6, 0.9], itertools.repeat(0.6))
    trainer.validate = lambda *args, **kwargs: {"clean_accuracy": 0.8, "pgd_accuracy": next(scores), "examples": 1}
cfg = resolve(dataset="fashion_mnist", data_dir=data, width=0.125, router_blocks=1, router_width=8, eps=0.1,
              attack_step=0.05, eval_step=0.05, eval_steps=1, val_size=100, train_examples=128, val_examples=16,
              batch_size=16, lr=0.05, **settings)
torch.manual_seed(cfg.seed)  # what the trainer builds first
initial = advmoe.create_model(cfg.model, **cfg.model_kwargs(advmoe.get_dataset_info(cfg.dataset)))
result = trainer.train(cfg, out, max_steps=3, test_examples=16, log=lambda *a: None)
rank = dist.get_rank()
if rank == 0:
    save_file({k: v.detach() for k, v in initial.named_parameters()}, f"{out}/initial.safetensors")
# Parameters: DDP keeps them equal. BatchNorm running statistics are each rank's own (the trainer
# does not broadcast buffers before each forward), so only rank 0 saves checkpoints.
save_file({k: v.detach().contiguous() for k, v in result.model.named_parameters()}, f"{out}/rank{rank}.safetensors")
with open(f"{out}/history{rank}.json", "w") as f:
    json.dump(result.history, f)
dist.destroy_process_group()
