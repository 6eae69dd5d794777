"""`n4-train sdg`: the synthetic data generation pipeline from the command line. The core CLI registers it with
`add_arguments(subparser)` and calls `run(args)`; `python -m n4_train.sdg.cli` runs it alone."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from n4_train.sdg.config import REWARD_FORMATS, STAGES, TASKS, SDGConfig
from n4_train.sdg.errors import SDGError

PROG = "n4-train sdg"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("servers")
    g.add_argument("--base-url", required=True,
                   help="OpenAI-compatible endpoint of the generator model, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", default=None, help="generator model name (default: the first of GET /models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for both servers (default: $OPENAI_API_KEY)")
    g.add_argument("--reward-base-url", default=None,
                   help="endpoint of the reward model, e.g. http://127.0.0.1:8001/v1 (needed to score and pair)")
    g.add_argument("--reward-model", default=None, help="reward model name (default: the first of GET /models)")
    g.add_argument("--reward-api-key", default=None, help="bearer token for the reward server (default: --api-key)")
    g.add_argument("--reward-format", choices=REWARD_FORMATS, default="n4",
                   help="n4: POST {base}/rewards; chat: a chat completion answering 'helpfulness:1.26,...' "
                        "(NVIDIA's hosted API)")
    g = p.add_argument_group("data")
    g.add_argument("--output", required=True, help="directory for the JSONL files and summary.json (resumable)")
    g.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    g.add_argument("--num-prompts", type=int, default=10, help="prompts per task (math: half local word problems)")
    g.add_argument("--responses-per-prompt", type=int, default=2, help="responses per prompt, at least 2")
    g.add_argument("--topics", dest="topics_file", default=None,
                   help="file of topics, one per line, used instead of generator-written topics")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice and request")
    g.add_argument("--no-refine", dest="refine", action="store_false",
                   help="skip the step that has the generator revise open Q&A and writing requests to be more "
                        "detailed")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--max-tokens", type=int, default=512, help="tokens per response")
    g.add_argument("--prompt-max-tokens", type=int, default=256,
                   help="tokens per prompt-writing call (topics, questions, passages, follow-ups)")
    g = p.add_argument_group("filtering and pairing")
    g.add_argument("--min-reward", type=float, default=None, help="drop responses with a lower reward scalar")
    g.add_argument("--min-margin", type=float, default=0.0,
                   help="least reward gap between chosen and rejected for a reward-ranked pair")
    g.add_argument("--keep-truncated", action="store_true",
                   help="keep responses cut off by --max-tokens (finish_reason length); dropped by default")
    g = p.add_argument_group("execution")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight per server")
    g.add_argument("--retries", type=int, default=4, help="retries of a request on 429/5xx/connection errors")
    g.add_argument("--timeout", dest="timeout_s", type=float, default=600.0, help="seconds per request")
    g.add_argument("--stop-after", choices=STAGES, default="pairs", help="last stage to run")


def config_from_args(args: argparse.Namespace) -> SDGConfig:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    fields = {name: getattr(args, name) for name in (
        "base_url", "output", "model", "api_key", "reward_base_url", "reward_model", "reward_api_key",
        "reward_format", "num_prompts", "responses_per_prompt", "concurrency", "temperature", "max_tokens",
        "prompt_max_tokens", "seed", "min_reward", "min_margin", "keep_truncated", "refine", "topics_file",
        "retries",
        "timeout_s", "stop_after")}
    return SDGConfig(tasks=tasks, **fields)


def _report(summary: dict) -> str:
    parts = [f"{summary['prompts']['total']} prompts"]
    if "responses" in summary:
        parts.append(f"{summary['responses']['total']} responses")
    if "scores" in summary:
        parts.append(f"{summary['scores']['total']} scores")
    if "pairs" in summary:
        parts.append(f"{summary['pairs']['total']} pairs")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """0 when every stage finished; 1 on an error (printed as one line); 130 when interrupted. Requests that failed
    after their retries do not fail the run: they are listed in summary.json and a rerun retries them."""
    from n4_train.sdg.pipeline import run_pipeline  # imported here so `--help` stays fast

    try:
        config = config_from_args(args)
    except ValueError as e:  # a bad flag value: argparse's exit status for usage errors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run_pipeline(config))
    except (SDGError, ValueError, OSError) as e:  # ValueError: a corrupt output file; OSError: disk full, ...
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"{PROG}: {_report(summary)} in {config.output}", file=sys.stderr)
    failed = summary["failures_this_run"]["total"]
    if failed:
        print(f"{PROG}: warning: {failed} request(s) failed (see summary.json); rerun to retry them",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Synthetic preference data as in the Nemotron-4 340B "
                                     "report: prompts, responses, reward scores, preference pairs.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
