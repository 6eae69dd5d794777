"""One training loop for every stage: AdamW, linear warmup + cosine decay, gradient accumulation, clipping,
periodic evaluation, a JSONL log, and resumable checkpoints.

A stage hands the trainer its model, its micro-batches (data.Batches), a `loss_sum(model, batch)` returning
(summed loss, metrics) and a `count(batch)` of what that sum is over; each optimizer step divides by the count
of its whole window of `grad_accum` micro-batches, so the update does not depend on how a batch was split.
Micro-batch k is a pure function of k and the RNG state is saved, so resuming from step N gives the same
weights as never stopping (tested bit for bit on the CPU).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from n4_train import distributed
from n4_train.precision import Precision

STATE_DIR = "trainer_state"
LOG_FILE = "train_log.jsonl"


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C or SIGTERM; `saved` tells whether the last finished step was saved for --resume."""

    def __init__(self, step: int, saved: bool):
        super().__init__(step, saved)
        self.step, self.saved = step, saved


class StopOnSignal:
    """Within the loop, SIGINT and SIGTERM (Ctrl-C, a scheduler preempting the job, `docker stop`) only ask the loop
    to stop at the next step boundary. An exception raised at an arbitrary point could land inside optimizer.step()
    (half-updated weights saved as the previous step) or between a step and its log line (a saved step the log never
    recorded: seen in CI). A second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    max_steps: int
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    clip_grad: float = 1.0
    save_every: int = 0      # steps between resumable checkpoints; 0: only at the end
    eval_every: int = 0      # steps between evaluations; 0: only at the end
    seed: int = 0

    def __post_init__(self):
        for name in ("max_steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_every", "weight_decay", "clip_grad"):
            # isfinite also refuses NaN, which passes a `< 0` check and makes clip_grad_norm_ (or AdamW's decay)
            # turn every weight NaN.
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative number, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate for optimizer step `step` (1-based): linear warmup to lr over warmup_steps, then cosine decay to
    lr * min_lr_ratio at max_steps."""
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, model: torch.nn.Module, precision: Precision, config: TrainConfig, batches,
                 loss_sum: Callable, count: Callable, evaluate: Callable[[], dict] | None = None):
        self.model, self.precision, self.config = model, precision, config
        self.batches, self.loss_sum, self.count, self.evaluate = batches, loss_sum, count, evaluate
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "norm" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "norm" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
        self.step = 0
        # Micro-batches consumed so far, over all ranks. Resuming continues from this count rather than from
        # step * grad_accum * world, which repeated or skipped data when --grad-accum or the rank count changed.
        self.micro_batches = 0
        os.makedirs(config.output_dir, exist_ok=True)

    # ---- resumable state ----------------------------------------------------------------------------------
    def _state_path(self, step: int) -> str:
        return os.path.join(self.config.output_dir, STATE_DIR, f"step-{step:07d}.pt")

    def save_state(self) -> str:
        path = self._state_path(self.step)
        if not distributed.is_main():  # every rank holds the same weights; one copy is enough
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": torch.get_rng_state(), "config": asdict(self.config), "micro_batches": self.micro_batches,
                 "batch_size": getattr(self.batches, "batch_size", None)}
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous state intact
        # Keep the last two states. Only .pt files count: a .tmp left by a crash mid-write sorted among them and
        # could leave a single real state. Such leftovers are removed (ours was just renamed).
        directory = os.path.dirname(path)
        names = os.listdir(directory)
        states = sorted(name for name in names if name.endswith(".pt"))
        for old in states[:-2] + [name for name in names if name.endswith(".tmp")]:
            os.remove(os.path.join(directory, old))
        return path

    def latest_state(self) -> str | None:
        directory = os.path.join(self.config.output_dir, STATE_DIR)
        if not os.path.isdir(directory):
            return None
        states = sorted(f for f in os.listdir(directory) if f.endswith(".pt"))
        return os.path.join(directory, states[-1]) if states else None

    def resume(self) -> bool:
        path = self.latest_state()
        if path is None:
            return False
        state = torch.load(path, map_location=self.precision.device, weights_only=False)
        batch_size = getattr(self.batches, "batch_size", None)
        if state.get("batch_size") not in (None, batch_size):  # micro-batch k would be other rows
            raise ValueError(f"{path} was trained with --batch-size {state['batch_size']}; resume it with the same "
                             f"batch size (got {batch_size})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self.micro_batches = state.get("micro_batches",  # states written before the count was saved
                                       self.step * state["config"]["grad_accum"] * distributed.world_size())
        self._truncate_log(self.step)
        return True

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        config = self.config
        self.model.train()
        last: dict = {}
        progress = tqdm(total=config.max_steps, initial=self.step, desc="train", disable=not sys.stderr.isatty())
        self._updating = False  # True from optimizer.step() until the step is logged: no consistent state to save
        try:
            with StopOnSignal() as stop:
                while self.step < config.max_steps:
                    start = time.perf_counter()
                    last = self._one_step()
                    last["step_time_s"] = round(time.perf_counter() - start, 4)
                    self._log(last)
                    self._updating = False
                    progress.update(1)
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                        self._run_eval()
                    if config.save_every and self.step % config.save_every == 0:
                        self.save_state()
                    # Every rank stops after the same step, or the others would wait forever in the next collective.
                    if distributed.sum_across_ranks(float(stop.requested), self.precision.device) > 0:
                        self.save_state()
                        raise TrainingInterrupted(self.step, saved=True)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as e:  # a second signal, or one raised by the stage's own code
            if self._updating:
                raise TrainingInterrupted(self.step, saved=False) from e
            self.save_state()  # mid-step, before the update: the last finished step is intact
            raise TrainingInterrupted(self.step, saved=True) from e
        finally:
            progress.close()
        self.save_state()
        final = self._run_eval() if self.evaluate else {}
        return {"step": self.step, "train": last, "eval": final}

    def _one_step(self) -> dict:
        config = self.config
        step = self.step + 1  # self.step counts finished steps only: an interrupt mid-step saves the one before
        lr = learning_rate(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Micro-batch k of the run goes to rank k % world: with W ranks a step consumes the same W * grad_accum
        # micro-batches one process would consume with grad_accum multiplied by W.
        world, rank = distributed.world_size(), distributed.rank()
        first = self.micro_batches
        window = [self._to_device(self.batches[first + j * world + rank]) for j in range(config.grad_accum)]
        total = int(distributed.sum_across_ranks(sum(self.count(batch) for batch in window), self.precision.device))
        loss_total, metrics = 0.0, {}
        for batch in window:
            with self.precision.autocast():
                loss, batch_metrics = self.loss_sum(self.model, batch)
            (loss / max(total, 1)).backward()
            loss_total += float(loss.detach())
            for key, value in batch_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
        distributed.sum_gradients(self.model)
        loss_total = distributed.sum_across_ranks(loss_total, self.precision.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad or float("inf"))
        self._updating = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.micro_batches = first + config.grad_accum * world
        record = {"step": step, "lr": lr, "loss": loss_total / max(total, 1), "count": total,
                  "grad_norm": float(grad_norm)}
        record.update({k: v / len(window) for k, v in metrics.items()})
        return record

    def _run_eval(self) -> dict:
        if not distributed.is_main():  # rank 0 evaluates; the others wait for it at the next collective
            return {}
        self.model.eval()
        with torch.no_grad(), self.precision.autocast():
            result = self.evaluate()
        self.model.train()
        self._log({"step": self.step, "eval": result})
        return result

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.precision.device) for k, v in batch.items()}

    # ---- log ----------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not distributed.is_main():
            return
        with open(os.path.join(self.config.output_dir, LOG_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")

    def start_log(self) -> None:
        """A fresh run starts a fresh log (a previous run that never saved a state leaves nothing to continue)."""
        self._truncate_log(0)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the resumed step (written after the state that is being resumed)."""
        if not distributed.is_main():
            return
        path = os.path.join(self.config.output_dir, LOG_FILE)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)
