"""Train and align Nemotron-4 models: pretrain, sft, rm, dpo, rpo, and synthetic data generation (sdg).

Errors are one line (`n4-train <stage>: error: ...`) with exit status 2; an interrupted run keeps its last
finished step's state for `--resume`. Data parallel: `torchrun --nproc-per-node N -m n4_train.cli <stage> ...`."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from n4_train.checkpoint import CheckpointError
from n4_train.precision import PRECISIONS, PrecisionError
from n4_train.tokenization import DataError
from n4_train.trainer import TrainingInterrupted

_DEFAULTS = {  # per stage: (lr, warmup, weight decay, seq len, max steps)
    "pretrain": (3e-3, 100, 0.1, 256, 1000),
    "sft": (5e-4, 10, 0.0, 512, 200),
    "rm": (3e-4, 10, 0.0, 512, 300),
    "dpo": (1e-5, 0, 0.0, 512, 50),
    "rpo": (1e-5, 0, 0.0, 512, 50),
}
_HELP = {
    "pretrain": "continued pretraining / pretraining from scratch on text (packed sequences)",
    "sft": "supervised fine-tuning on chat JSONL; loss on assistant turns only",
    "rm": "reward model (Nemotron-4-340B-Reward layout) on HelpSteer2-format JSONL",
    "dpo": "direct preference optimization against the frozen initial model",
    "rpo": "reward-aware preference optimization (the 340B report's RPO)",
}


def _add_training_args(parser: argparse.ArgumentParser, stage: str) -> None:
    lr, warmup, decay, seq_len, steps = _DEFAULTS[stage]
    parser.add_argument("--model", required=True,
                        help="HF checkpoint directory to start from, or a preset / config.json for random init")
    parser.add_argument("--tokenizer", help="directory with tokenizer.model (default: --model)")
    parser.add_argument("--data", required=True, nargs="+", help="training file(s)")
    parser.add_argument("--eval-data", nargs="+", help="held-out file(s) evaluated every --eval-every steps")
    parser.add_argument("--output", required=True, help="directory for the exported checkpoint, log and state")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per row (longest sequence)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows (or pairs) per micro-batch, per data-parallel rank")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    parser.add_argument("--warmup-steps", type=int, default=warmup)
    parser.add_argument("--weight-decay", type=float, default=decay)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--save-every", type=int, default=0, help="steps between resumable states (0: at the end)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp8 runs transformer-engine linears under fp8_autocast (GPU only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest state in --output")
    parser.add_argument("--export-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    if stage in ("dpo", "rpo"):
        parser.add_argument("--beta", type=float, default=0.1, help="scale of the implicit reward β")
        parser.add_argument("--eta", type=float, default=1.0, help="RPO: scale of the reward model's gap η")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="n4-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage in _DEFAULTS:
        _add_training_args(sub.add_parser(stage, help=_HELP[stage], description=_HELP[stage]), stage)
    from n4_train.sdg import cli as sdg_cli
    sdg_cli.add_arguments(sub.add_parser("sdg", help="synthetic data generation through OpenAI-compatible servers",
                                         description="synthetic prompts, responses, reward scores and "
                                                     "preference pairs"))
    return parser


def run(args) -> int:
    from n4_train import stages
    if args.stage == "sdg":
        from n4_train.sdg import cli as sdg_cli
        return sdg_cli.run(args)
    if args.stage == "rm":
        result = stages.run_rm(args)
    elif args.stage in ("dpo", "rpo"):
        result = stages.run_preference(args, args.stage)
    else:
        result = stages.run_lm(args, chat=args.stage == "sft")
    from n4_train import distributed
    if distributed.is_main():
        print(f"exported {result.output_dir} (step {result.summary['step']})")
        if result.summary.get("eval"):
            print(f"eval: {result.summary['eval']}")
    distributed.shutdown()
    return 0


def _interrupt_on_sigterm() -> None:
    """SIGTERM outside the training loop (loading data, exporting) exits like Ctrl-C, with a message; inside the
    loop the trainer stops at the next step boundary and saves that step (trainer.StopOnSignal)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage != "sdg":  # sdg handles its own interrupts (records are written line by line)
        _interrupt_on_sigterm()
    try:
        return run(args)
    except (DataError, CheckpointError, PrecisionError, ValueError, OSError) as e:
        print(f"n4-train {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        what = (f"state of step {e.step} saved, continue with --resume" if e.saved
                else "a second signal arrived mid-update, so nothing was saved after the last --save-every state")
        print(f"n4-train {args.stage}: interrupted; {what}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"n4-train {args.stage}: interrupted outside the training loop (a state saved earlier, if any, "
              "continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
