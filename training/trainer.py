"""The training loop: one code path for every method, a run directory a user can trust.

Run directory: config.json (the resolved config), last/ and best/ (checkpoints; last/ also holds
training_state.pt for --resume), metrics.jsonl and metrics.csv (one row per epoch), plots/.
The best checkpoint is selected on validation PGD accuracy (or, with select_on = "worst", on
the worst case of PGD and the route-fixed attack), never on the test set; the test
set is evaluated once, for the best checkpoint, at the end.

The collapse guard (collapse_guard = "rollback"): when that validation accuracy falls more than
OVERFIT_DROP under its best, the run goes back to the end of the best epoch (weights, optimiser and
scheduler state, which best/ then also holds) and trains on from there with a stronger training
attack (`strengthened`), at most MAX_ROLLBACKS times; metrics.jsonl records each event.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

import advmoe
from advmoe.checkpoint import read_metrics
from advmoe.data import augment
from advmoe.distributed import setup as join_group
from advmoe.io import atomic_write_text

from . import plots
from .config import MAX_ROLLBACKS, OVERFIT_DROP, ConfigError, TrainConfig, with_defaults
from .methods import METHODS, Diverged, Step
from .validate import validate

STATE = "training_state.pt"
COLLAPSE_SHARE = 0.9
SELECTED_ON = {"pgd": "PGD", "worst": "worst-case (PGD, route-fixed and APGD)"}  # what select_on ranks, in the log


def collapsed(best: float, now: float) -> bool:
    """Validation robustness fell more than OVERFIT_DROP under its best: a dip of a few points is noise."""
    return best - now > OVERFIT_DROP


def overfitting_warning(best: float, now: float, accuracy: str = "PGD") -> str | None:
    if not collapsed(best, now):
        return None
    return (f"warning: validation {accuracy} accuracy fell from its best {best:.1%} to {now:.1%}: the training attack "
            "may have overfit catastrophically (the best checkpoint is kept; try more --attack-steps or "
            "--attack-start uniform)")


def strengthened(cfg: TrainConfig, rollbacks: int) -> TrainConfig:
    """The config whose training attack follows `rollbacks` rollbacks of the collapse guard: one
    more step per rollback, over the configured attack's path (attack_steps * attack_step, at least
    eps), so the steps get shorter and still reach the edge of the ball. A few steps, each a large
    share of eps, are what overfits catastrophically (Wong et al. 2020, "Fast is better than free");
    more and shorter steps are the known remedy. Each costs one more forward and backward per
    crafted batch for the rest of the run."""
    if rollbacks == 0:
        return cfg
    steps = cfg.attack_steps + rollbacks
    return replace(cfg, attack_steps=steps, attack_step=max(cfg.attack_steps * cfg.attack_step, cfg.eps) / steps)


class TrainingDiverged(RuntimeError):
    """Training stopped on a NaN or infinite loss; the last good checkpoint is kept."""


@dataclass
class RunResult:
    out: Path
    best: Path
    history: list[dict]
    test: dict
    model: torch.nn.Module  # this process's model after the last epoch


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, log=functools.partial(print, flush=True), max_steps: int | None = None,
          test_examples: int = 2000) -> RunResult:
    """Train `cfg` into the run directory `out` (new, or an interrupted run of the same config
    with resume=True). max_steps caps the steps per epoch (tests)."""
    cfg.validate()
    out = Path(out)
    # A group joined here is left to the launcher's script, which may still use it after train().
    rank, world, _ = join_group(cfg.device)
    distributed = dist.is_initialized()  # one rank under torchrun too: the same DDP path as eight
    device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if rank == 0:
        _check_run_dir(cfg, out, resume)
    info = advmoe.get_dataset_info(cfg.dataset, cfg.data_dir, cfg.image_size)
    train_set = _split(cfg, "train")
    if cfg.train_examples:
        train_set = Subset(train_set, range(min(cfg.train_examples, len(train_set))))
    val_set = _split(cfg, "val")
    val_set = Subset(val_set, range(min(cfg.val_examples, len(val_set))))

    torch.manual_seed(cfg.seed)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(info)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if distributed:
        forward = _ddp(model, device)
    if cfg.compile:
        forward = torch.compile(forward)
    optimizers = make_optimizers(cfg, model)
    steps_per_epoch = math.ceil(len(train_set) / world / cfg.batch_size)
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    total = cfg.epochs * steps_per_epoch
    schedulers = {g: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
                  for g, o in optimizers.items()}
    step = Step(model, cfg, optimizers, forward, _autocast(cfg, device), _scaler(cfg), distributed=distributed)

    start_epoch, best_score, history, rollbacks = 0, -1.0, [], 0
    if resume and (out / "last" / STATE).is_file():
        start_epoch, best_score, history, rollbacks = _restore(out, model, optimizers, schedulers)
        log(f"resuming {out} after epoch {start_epoch}")
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    step.cfg = strengthened(cfg, rollbacks)  # the training attack; validation's PGD stays cfg's
    if distributed:
        dist.barrier()  # the other ranks start once rank 0 has checked and made the run directory

    checkpoint_config = {"dataset": cfg.dataset, "classes": list(info.classes), "training": cfg.to_dict()}
    quiet = rank != 0 or bool(os.environ.get("CI")) or not sys.stderr.isatty()
    epoch = start_epoch
    while epoch < cfg.epochs:
        # Each epoch seeds its own data order and attack noise: a resumed run repeats exactly
        # what the uninterrupted run would have done.
        torch.manual_seed(cfg.seed * 10_007 + epoch)
        loader = _loader(train_set, cfg, epoch, distributed)
        # Augmentation draws from a generator of its own: the attack noise is the same with or without it.
        augmentation = torch.Generator().manual_seed((cfg.seed * 10_007 + epoch) * 65_537 + rank + 1)
        model.train()
        started, seen, sums = time.perf_counter(), 0, {}
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=quiet, unit="batch")
        for i, (x, y) in enumerate(loader):
            if i == steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = augment(x, cfg.augment, augmentation)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                stats = METHODS[cfg.method].step(step, x, y)
            except Diverged as e:
                last = f"{out / 'last'} (epoch {epoch})" if epoch else "none (it diverged in the first epoch)"
                raise TrainingDiverged(f"{e} at epoch {epoch + 1}, step {i + 1}: training stopped; "
                                       f"the last good checkpoint is {last}. Lower --lr or check the data.") from None
            for scheduler in schedulers.values():
                scheduler.step()
            seen += len(y)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()} | {"samples/s": f"{seen / (time.perf_counter() - started):.0f}"})
            bar.update()
        bar.close()
        seconds = time.perf_counter() - started
        val = validate(model, val_set, step.cfg, device, train_attack=True)
        validation_seconds = time.perf_counter() - started - seconds  # what the validation attacks cost
        row = {"epoch": epoch + 1, "lr": schedulers[METHODS[cfg.method].groups[0]].get_last_lr()[0],
               **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
               **{f"val_{k}": v for k, v in val.items() if k not in ("pgd", "examples")},
               "epoch_seconds": seconds, "validation_seconds": validation_seconds,
               "samples_per_second": seen / seconds,
               "attack_steps_per_batch": METHODS[cfg.method].attack_steps(step.cfg),
               "training_attack_steps": step.cfg.attack_steps, "training_attack_step": step.cfg.attack_step}
        history.append(row)
        shares = val.get("expert_share")
        if shares and max(shares) > COLLAPSE_SHARE:
            log(f"warning: expert collapse: expert {shares.index(max(shares))} takes {max(shares):.0%} of the "
                f"validation routes (try --balance-weight 0.01)")
        score = val[f"{cfg.select_on}_accuracy"]
        if distributed:  # each rank validates with its own BatchNorm statistics: all decide on rank 0's
            score = _rank0_value(score, device)
        warning = overfitting_warning(best_score, score, SELECTED_ON[cfg.select_on])
        if warning:
            log(warning)
        improved = score > best_score
        best_score = max(best_score, score)
        fixed = f", route-fixed {val['route_fixed_accuracy']:.4f}" if "route_fixed_accuracy" in val else ""
        if "apgd_accuracy" in val:
            fixed += f", APGD-CE+DLR {val['apgd_accuracy']:.4f}"
        if "train_attack_accuracy" in val:
            fixed += f", training attack PGD-{step.cfg.attack_steps} {val['train_attack_accuracy']:.4f}"
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row.get('train_loss', float('nan')):.4f}, "
            f"val clean {val['clean_accuracy']:.4f}, val PGD-{cfg.eval_steps} {val['pgd_accuracy']:.4f}{fixed}"
            f"{', experts ' + '/'.join(f'{s:.2f}' for s in shares) if shares else ''}, "
            f"{seconds:.0f}s ({seen / seconds:.0f} samples/s){' *best*' if improved else ''}")
        next_epoch = epoch + 1
        if cfg.collapse_guard == "rollback" and collapsed(best_score, score):
            row["collapse_guard"], back_to = _roll_back(cfg, out, score, best_score, rollbacks, model, optimizers,
                                                        schedulers, log)
            if back_to is not None:
                next_epoch, rollbacks = back_to, rollbacks + 1
                step.cfg = strengthened(cfg, rollbacks)
        if rank == 0:
            # last/ is what training goes on from: after a rollback, the best epoch's weights and metrics
            metrics = ({**{f"val_{k}": v for k, v in val.items()}, "epoch": epoch + 1} if next_epoch == epoch + 1
                       else read_metrics(out / "best"))
            state = {"epoch": next_epoch, "best_score": best_score, "history": json.dumps(history),
                     "rollbacks": rollbacks, "optimizers": {g: o.state_dict() for g, o in optimizers.items()},
                     "schedulers": {g: s.state_dict() for g, s in schedulers.items()}}
            files = {STATE: lambda path: torch.save(state, path)}
            if improved:  # with the guard, best/ keeps what a rollback restores
                advmoe.save_checkpoint(model, out / "best", metrics=metrics, config=checkpoint_config,
                                       files=files if cfg.collapse_guard == "rollback" else None)
            advmoe.save_checkpoint(model, out / "last", metrics=metrics, config=checkpoint_config, files=files)
            _write_logs(out, history)
        epoch = next_epoch
    test = {}
    if rank == 0:
        test = _final_test(cfg, out, device, test_examples, checkpoint_config, log)
    if distributed:
        dist.barrier()
    return RunResult(out=out, best=out / "best", history=history, test=test, model=model)


def _final_test(cfg: TrainConfig, out: Path, device, n: int, checkpoint_config: dict, log) -> dict:
    """Evaluate the best checkpoint once on the test set; its metrics.json gets the numbers."""
    best = advmoe.load_checkpoint(out / "best", map_location=device)
    test_set = _split(cfg, "test")
    test = validate(best, Subset(test_set, range(min(n, len(test_set)))), cfg, device, seed=cfg.seed)
    metrics = {**read_metrics(out / "best"), **{f"test_{k}": v for k, v in test.items()},
               "clean_accuracy": test["clean_accuracy"], "pgd_accuracy": test["pgd_accuracy"]}
    advmoe.save_checkpoint(best, out / "best", metrics=metrics, config=checkpoint_config)
    log(f"best checkpoint {out / 'best'} (epoch {metrics['epoch']}): test clean {test['clean_accuracy']:.4f}, "
        f"test PGD-{cfg.eval_steps} {test['pgd_accuracy']:.4f} on {test['examples']} examples, "
        f"{metrics['macs_per_image'] / 1e6:.1f} MMACs per image")
    return test


def _check_run_dir(cfg: TrainConfig, out: Path, resume: bool) -> None:
    if resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no run (no config.json); drop --resume to start one")
        previous = with_defaults(json.loads(saved.read_text()))
        changed = {k: (previous.get(k), v) for k, v in cfg.to_dict().items() if previous.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in sorted(changed.items()))
            raise ConfigError(f"--resume: {out} belongs to another config ({diff})")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pass --resume to continue it or choose another --out")


def _roll_back(cfg: TrainConfig, out: Path, score: float, best_score: float, rollbacks: int, model, optimizers,
               schedulers, log) -> tuple[dict, int | None]:
    """The collapse guard after a collapsed epoch: the best epoch's weights, optimiser and scheduler
    state put back from best/ (every rank reads the same files), unless the run has used its
    rollbacks. Returns the event for the epoch's log row and the number of epochs done that
    training goes on after (None: it goes on from this epoch)."""
    event = {"metric": f"val_{cfg.select_on}_accuracy", "best": best_score, "now": score}
    if rollbacks >= MAX_ROLLBACKS:
        event["action"] = f"none: the run has used its {MAX_ROLLBACKS} rollbacks; training goes on"
    elif not (out / "best" / STATE).is_file():
        event["action"] = "none: best/ holds no training state (it was written before the collapse guard)"
    else:
        event["best_epoch"] = _load_state(out / "best", model, optimizers, schedulers)["epoch"]
        attack = strengthened(cfg, rollbacks + 1)
        event["action"] = (f"rolled back to epoch {event['best_epoch']}; training attack now {attack.attack_steps} "
                           f"steps of {attack.attack_step:.4g}")
    log(f"collapse guard: {event['action']}")
    return event, event.get("best_epoch")


def _restore(out: Path, model, optimizers, schedulers) -> tuple[int, float, list, int]:
    state = _load_state(out / "last", model, optimizers, schedulers)
    return state["epoch"], state["best_score"], json.loads(state["history"]), state.get("rollbacks", 0)


def _load_state(folder: Path, model, optimizers, schedulers) -> dict:
    """Weights, optimiser and scheduler state from a checkpoint with its training state; the state."""
    model.load_state_dict(advmoe.load_checkpoint(folder).state_dict())
    state = torch.load(folder / STATE, weights_only=True, map_location="cpu")  # each optimiser moves its own
    for g, o in optimizers.items():
        o.load_state_dict(state["optimizers"][g])
        schedulers[g].load_state_dict(state["schedulers"][g])
    return state


def _rank0_value(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def make_optimizers(cfg: TrainConfig, model) -> dict[str, torch.optim.Optimizer]:
    def sgd(params, lr):
        return torch.optim.SGD(list(params), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    if METHODS[cfg.method].groups == ("all",):
        return {"all": sgd(model.parameters(), cfg.lr)}
    return {"experts": sgd(model.expert_parameters(), cfg.lr), "router": sgd(model.router_parameters(), cfg.router_lr or cfg.lr)}


def _split(cfg: TrainConfig, split: str):
    return advmoe.load_dataset(cfg.dataset, split, cfg.data_dir, cfg.val_size, cfg.seed, image_size=cfg.image_size,
                               augment=cfg.augment, bad_images=cfg.bad_images)


def _loader(dataset, cfg: TrainConfig, epoch: int, distributed: bool) -> DataLoader:
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
    # the workers' seeds (a folder data set's random crops) come from the epoch's too
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                      pin_memory=cfg.device == "cuda", drop_last=False,
                      generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _scaler(cfg: TrainConfig):
    return torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP without the broadcast of rank 0's buffers before every forward. The methods run several
    forwards before one backward (TRADES: clean and adversarial), and that in-place broadcast
    overwrote BatchNorm statistics an earlier forward had saved for its backward (on CUDA: "modified
    by an inplace operation"). Each rank keeps its own running statistics; checkpoints are rank 0's."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers (and warns on the old name)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False})


def _write_logs(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in history)
    atomic_write_text(out / "metrics.csv", buffer.getvalue())
    plots.write(out / "plots", history)
