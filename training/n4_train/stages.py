"""The stages behind `n4-train pretrain|sft|rm|dpo|rpo`: each builds its data, model and objective, runs the
shared Trainer, and exports an HF checkpoint (loadable by `n4 serve` and transformers) into --output."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from n4_train import data as D
from n4_train import distributed
from n4_train.checkpoint import build_model, export_hf
from n4_train.losses import (dpo_loss, lm_loss_sum, reward_regression_sum, rpo_loss, sequence_logprobs)
from n4_train.modeling import TrainableNemotron
from n4_train.precision import resolve_precision
from n4_train.tokenization import TrainTokenizer
from n4_train.trainer import TrainConfig, Trainer


def say(message: str) -> None:
    if distributed.is_main():  # one line per run, not one per data-parallel rank
        print(message)


@dataclass
class StageResult:
    output_dir: str
    summary: dict


def check_arguments(args) -> None:
    """Refuse settings that would crash mid-run with a traceback (--batch-size 0 divides by zero in data.Batches) or
    train silently on nonsense (a NaN β makes every weight NaN; β = 0 makes the DPO loss a constant log 2)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seq_len < 2:  # a row needs a token and the next one to predict
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    for name in ("beta", "eta"):  # dpo and rpo only
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a positive number, got {value}")


def _setup(args, reward: bool = False):
    check_arguments(args)
    torch.manual_seed(args.seed)
    device = distributed.init_from_env(torch.device(args.device))  # a no-op unless started by torchrun
    precision = resolve_precision(args.precision, device)
    tokenizer = TrainTokenizer(args.tokenizer or args.model)
    net = build_model(args.model, precision, reward=reward, seed=args.seed)
    net.activation_checkpointing = args.activation_checkpointing
    if tokenizer.vocab_size > net.config.vocab_size:
        raise D.DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{net.config.vocab_size}")
    train_config = TrainConfig(
        output_dir=args.output, max_steps=args.max_steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_accum=args.grad_accum,
        clip_grad=args.clip_grad, save_every=args.save_every, eval_every=args.eval_every, seed=args.seed)
    return precision, tokenizer, net, train_config


def _finish(trainer: Trainer, args, tokenizer_dir: str, extra: dict) -> StageResult:
    if args.resume and trainer.resume():
        say(f"resumed from step {trainer.step}")
    elif not args.resume and trainer.latest_state():
        raise D.DataError(f"--output {args.output} already holds a training state: pass --resume to continue it, "
                          f"or choose another directory")
    else:
        trainer.start_log()
    summary = trainer.train()
    summary.update(extra, data_parallel_ranks=distributed.world_size())
    if distributed.is_main():
        export_hf(trainer.model, args.output, tokenizer_dir, args.export_dtype)
        with open(os.path.join(args.output, "training_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    distributed.barrier()  # the other ranks return once the checkpoint is complete
    return StageResult(args.output, summary)


def _tokenizer_dir(args) -> str:
    path = args.tokenizer or args.model
    return os.path.dirname(path) if os.path.isfile(path) else path


def in_batches(rows, batch_size: int, device):
    """Every row of `rows` once, in order, in batches of batch_size on `device` (for evaluation passes)."""
    for start in range(0, len(rows), batch_size):
        batch = rows.select(torch.arange(start, min(start + batch_size, len(rows))))
        yield {k: v.to(device) for k, v in batch.items()}


# ---- causal LM: pretraining and SFT -----------------------------------------------------------------------------

def _lm_objective(model: TrainableNemotron, batch: dict):
    logits = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"])  # [B, S, V] fp32
    loss, _ = lm_loss_sum(logits, batch["labels"])
    return loss, {}


def _lm_count(batch: dict) -> int:
    return int((batch["labels"] != D.IGNORE).sum())


@torch.no_grad()
def lm_evaluation(model: TrainableNemotron, rows: D.Rows, batch_size: int, device) -> dict:
    """Mean next-token loss (nats) and perplexity over every trained token of `rows`."""
    total, count = 0.0, 0
    for batch in in_batches(rows, batch_size, device):
        loss, n = lm_loss_sum(model(batch["input_ids"], batch["position_ids"], batch["segment_ids"]), batch["labels"])
        total, count = total + float(loss), count + n
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": float(torch.tensor(mean).exp()), "tokens": count}


def run_lm(args, chat: bool) -> StageResult:
    precision, tokenizer, net, config = _setup(args)
    if chat:
        rows, skipped = D.chat_rows(args.data, tokenizer, args.seq_len)
        eval_rows = D.chat_rows(args.eval_data, tokenizer, args.seq_len)[0] if args.eval_data else None
    else:
        rows, skipped = D.pretraining_rows(args.data, tokenizer, args.seq_len), 0
        eval_rows = D.pretraining_rows(args.eval_data, tokenizer, args.seq_len) if args.eval_data else None
    say(f"{len(rows)} rows of {args.seq_len} tokens, {rows.trained_tokens} trained tokens"
          + (f", {skipped} conversations longer than a row skipped" if skipped else ""))
    evaluate = (lambda: lm_evaluation(net, eval_rows, args.batch_size, precision.device)) if eval_rows else None
    trainer = Trainer(net, precision, config, D.Batches(rows, args.batch_size, args.seed), _lm_objective, _lm_count,
                      evaluate)
    extra = {"train_rows": len(rows), "trained_tokens_per_epoch": rows.trained_tokens, "skipped": skipped,
             "uniform_baseline_loss": float(torch.tensor(float(net.config.vocab_size)).log())}
    return _finish(trainer, args, _tokenizer_dir(args), extra)


# ---- reward model ------------------------------------------------------------------------------------------------

def reward_values(model: TrainableNemotron, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, S] right-padded rows -> the head's values at each row's last token [B, num_labels] fp32."""
    hidden = model.hidden_states(input_ids)                                   # [B, S, hidden]
    at_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, hidden]
    return model.lm_head(at_last).float()                                     # [B, num_labels]


def _rm_objective(model, batch):
    values = reward_values(model, batch["input_ids"], batch["last"])
    return reward_regression_sum(values, batch["targets"]), {}


@torch.no_grad()
def rm_evaluation(model: TrainableNemotron, rows: D.RewardRows, batch_size: int, device) -> dict:
    """Per attribute: Pearson correlation and mean squared error of the prediction on held-out rows."""
    predicted = []
    for batch in in_batches(rows, batch_size, device):
        predicted.append(reward_values(model, batch["input_ids"], batch["last"])[:, -5:].cpu())
    predicted = torch.cat(predicted)                                          # [N, 5]
    result = {}
    for i, name in enumerate(D.ATTRIBUTES):
        x, y = predicted[:, i].double(), rows.targets[:, i].double()
        r = torch.corrcoef(torch.stack([x, y]))[0, 1]
        result[name] = {"pearson": float(r), "mse": float((x - y).square().mean())}
    return result


def run_rm(args) -> StageResult:
    precision, tokenizer, net, config = _setup(args, reward=True)
    # Every --data / --eval-data file (reading only the first silently dropped the others).
    rows, skipped = D.helpsteer_rows(args.data, tokenizer, args.seq_len)
    eval_rows = D.helpsteer_rows(args.eval_data, tokenizer, args.seq_len)[0] if args.eval_data else None
    say(f"{len(rows)} reward rows" + (f", {skipped} longer than {args.seq_len} tokens skipped" if skipped else ""))
    evaluate = (lambda: rm_evaluation(net, eval_rows, args.batch_size, precision.device)) if eval_rows else None
    trainer = Trainer(net, precision, config, D.Batches(rows, args.batch_size, args.seed), _rm_objective,
                      lambda batch: batch["targets"].numel(), evaluate)
    return _finish(trainer, args, _tokenizer_dir(args), {"train_rows": len(rows), "skipped": skipped})


# ---- DPO / RPO ---------------------------------------------------------------------------------------------------

def pair_logprobs(model: TrainableNemotron, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and rejected sides [B] each."""
    chosen = sequence_logprobs(model(batch["chosen"]), batch["chosen_labels"])
    rejected = sequence_logprobs(model(batch["rejected"]), batch["rejected_labels"])
    return chosen, rejected


def reference_logprobs(model: TrainableNemotron, rows: D.PreferenceRows, batch_size: int, device) -> torch.Tensor:
    """The frozen reference's log-probs [N, 2], computed once before training (the reference is the initial
    policy, so no second model stays in memory)."""
    out = []
    model.eval()
    with torch.no_grad():
        for batch in in_batches(rows, batch_size, device):
            out.append(torch.stack(pair_logprobs(model, batch), dim=-1).cpu())
    model.train()
    return torch.cat(out)


class _WithReference:
    """Preference rows plus their reference log-probs, selectable together."""

    def __init__(self, rows: D.PreferenceRows, reference: torch.Tensor):
        self.rows, self.reference = rows, reference

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, index):
        batch = self.rows.select(index)
        batch["reference"] = self.reference[index]
        return batch


def preference_objective(method: str, beta: float, eta: float):
    def objective(model, batch):
        chosen, rejected = pair_logprobs(model, batch)
        ref = batch["reference"]
        delta = ((chosen - ref[:, 0]) - (rejected - ref[:, 1])).detach()
        if method == "dpo":
            losses = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)
        else:
            losses = rpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], batch["rewards"][:, 0], batch["rewards"][:, 1],
                              beta, eta)
        return losses.sum(), {"margin": float(delta.mean()), "accuracy": float((delta > 0).float().mean())}
    return objective


@torch.no_grad()
def preference_evaluation(model, rows: _WithReference, batch_size: int, device) -> dict:
    """Held-out mean implicit reward margin Δ and the fraction of pairs with Δ > 0."""
    deltas = []
    for batch in in_batches(rows, batch_size, device):
        chosen, rejected = pair_logprobs(model, batch)
        ref = batch["reference"]
        deltas.append(((chosen - ref[:, 0]) - (rejected - ref[:, 1])).cpu())
    delta = torch.cat(deltas)
    return {"margin": float(delta.mean()), "accuracy": float((delta > 0).float().mean()), "pairs": len(delta)}


def _drop_contradicted(rows: D.PreferenceRows) -> tuple[D.PreferenceRows, int]:
    """Pairs ranked by ground truth (a checked arithmetic answer) can carry a reward-model gap that points the other
    way. DPO only needs the ranking; RPO fits β·Δ to the gap, so on such a pair it would teach the wrong preference:
    those pairs are left out of RPO."""
    keep = rows.rewards[:, 0] >= rows.rewards[:, 1]
    if bool(keep.all()):
        return rows, 0
    if not bool(keep.any()):
        raise D.DataError("every pair's rewards rank the rejected response above the chosen one: nothing for RPO")
    kept = D.PreferenceRows(rows.chosen[keep], rows.chosen_labels[keep], rows.rejected[keep],
                            rows.rejected_labels[keep], rows.rewards[keep])
    return kept, int((~keep).sum())


def run_preference(args, method: str) -> StageResult:
    precision, tokenizer, net, config = _setup(args)
    rows, skipped = D.preference_rows(args.data, tokenizer, args.seq_len)  # every file, not only the first
    contradicted = 0
    if method == "rpo":
        if torch.isnan(rows.rewards).any():
            raise D.DataError(f"{', '.join(args.data)}: RPO needs chosen_reward and rejected_reward on every pair")
        rows, contradicted = _drop_contradicted(rows)
        if contradicted:
            say(f"{contradicted} pairs whose rewards rank rejected above chosen skipped (RPO would fit that gap)")
    # π_ref is the initial policy, so Δ must start at 0: the reference runs under the same autocast as the policy's
    # forward in the trainer (and its evaluations). Computed in fp32 against a bf16 policy, Δ started at the
    # rounding difference of the two precisions instead, and "eval_before" was measured in another precision than
    # the evaluations it is compared with.
    with precision.autocast():
        train = _WithReference(rows, reference_logprobs(net, rows, args.batch_size, precision.device))
        held_out = None
        if args.eval_data:
            eval_rows = D.preference_rows(args.eval_data, tokenizer, args.seq_len)[0]
            held_out = _WithReference(eval_rows, reference_logprobs(net, eval_rows, args.batch_size, precision.device))
        before = preference_evaluation(net, held_out, args.batch_size, precision.device) if held_out else None
    evaluate = (lambda: preference_evaluation(net, held_out, args.batch_size, precision.device)) if held_out else None
    trainer = Trainer(net, precision, config, D.Batches(train, args.batch_size, args.seed),
                      preference_objective(method, args.beta, args.eta), lambda batch: batch["chosen"].shape[0],
                      evaluate)
    return _finish(trainer, args, _tokenizer_dir(args),
                   {"method": method, "beta": args.beta, "eta": args.eta, "pairs": len(rows), "skipped": skipped,
                    "skipped_reward_contradicts_preference": contradicted,
                    "eval_before": before})

