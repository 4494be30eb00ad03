"""Run by test_ddp.py under torchrun: a few DDP steps on the CPU (gloo), then each rank saves
the weights it holds."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import advmoe
from training.config import resolve
from training.trainer import train

out, data = sys.argv[1], sys.argv[2]
cfg = resolve(dataset="fashion_mnist", data_dir=data, model="moe_resnet18", width=0.125, router_blocks=1,
              router_width=8, method="advmoe", eps=0.1, attack_step=0.05, eval_step=0.05, eval_steps=1,
              val_size=100, train_examples=128, val_examples=16, batch_size=16, epochs=1, lr=0.05)
torch.manual_seed(cfg.seed)  # what the trainer builds first
initial = advmoe.create_model(cfg.model, **cfg.model_kwargs(advmoe.get_dataset_info(cfg.dataset)))
result = train(cfg, out, max_steps=3, test_examples=16, log=lambda *a: None)
rank = dist.get_rank()
if rank == 0:
    save_file({k: v.detach() for k, v in initial.named_parameters()}, f"{out}/initial.safetensors")
# Parameters: DDP keeps them equal. BatchNorm running statistics are each rank's own (the trainer
# does not broadcast buffers before each forward), so only rank 0 saves checkpoints.
save_file({k: v.detach().contiguous() for k, v in result.model.named_parameters()}, f"{out}/rank{rank}.safetensors")
dist.destroy_process_group()
