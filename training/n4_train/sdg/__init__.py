"""Synthetic data generation (SDG) as in the Nemotron-4 340B report: a generator model writes prompts (open Q&A,
writing, closed Q&A, math, coding; single-turn, instruction-following and two-turn), answers each several times,
a reward model scores the answers, and the best and worst answers become preference pairs for DPO/RPO.

Everything talks to OpenAI-compatible HTTP servers (n4 serve or a hosted API), never to `server` in-process:
`n4_train` must not import the serving package. Each stage appends whole JSONL lines to the output directory and
skips records already there, so a killed run resumes where it stopped. Entry point: `n4-train sdg` (cli.py)."""
from n4_train.sdg.config import KINDS, TASKS, SDGConfig
from n4_train.sdg.errors import SDGError

__all__ = ["KINDS", "SDGConfig", "SDGError", "TASKS"]
