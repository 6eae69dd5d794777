"""Loss curves of training runs as one PNG: the training loss of each step (smoothed) and the held-out loss at each
evaluation, read from the runs' `train_log.jsonl`.

    python training/demo/plot_loss.py --run pretrain=/path/to/pretrained --run sft=/path/to/sft --output loss.png

Needs matplotlib (`pip install 'n4-training[plot]'`)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_log(run_dir: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train [(step, loss)], eval [(step, loss)]) of one run."""
    path = os.path.join(run_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: no train_log.jsonl (is it an n4-train --output directory?)")
    train, held_out = [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "eval" in record:
                if isinstance(record["eval"].get("loss"), (int, float)):
                    held_out.append((record["step"], record["eval"]["loss"]))
            else:
                train.append((record["step"], record["loss"]))
    return train, held_out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (per-step losses of small batches are noisy)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run to plot")
    parser.add_argument("--output", required=True, help="PNG path")
    parser.add_argument("--baseline", type=float, help="draw a horizontal line at this loss (e.g. ln(vocab))")
    parser.add_argument("--window", type=int, default=20, help="steps in the training-loss moving average")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        runs = []
        for spec in args.run:
            name, sep, run_dir = spec.partition("=")
            if not sep:
                raise ValueError(f"--run {spec!r}: expected NAME=DIR")
            runs.append((name, *read_log(run_dir)))
    except (ImportError, ValueError) as e:
        print(f"plot_loss: error: {e}", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (name, train, held_out) in zip(axes[0], runs):
        steps = [s for s, _ in train]
        ax.plot(steps, smooth([l for _, l in train], args.window), label=f"train (mean of {args.window} steps)")
        if held_out:
            ax.plot(*zip(*held_out), "o-", label="held-out")
        if args.baseline:
            ax.axhline(args.baseline, color="grey", linestyle="--", label=f"uniform ({args.baseline:.2f})")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_ylim(0, max(max(l for _, l in train[min(len(train) - 1, 5):]) * 1.1,
                           (args.baseline or 0) * 1.05))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output} ({', '.join(f'{n}: final held-out {h[-1][1]:.3f}' for n, _, h in runs if h)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
