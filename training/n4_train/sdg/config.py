"""SDGConfig: every knob of a run, validated once with messages a user understands."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

TASKS = ("open_qa", "writing", "closed_qa", "math", "coding")
KINDS = ("single_turn", "instruction_following", "two_turn")
STAGES = ("prompts", "responses", "scores", "pairs")
REWARD_FORMATS = ("n4", "chat")


@dataclass(frozen=True)
class SDGConfig:
    base_url: str
    output: str
    model: str | None = None             # None: the first model the generator lists
    api_key: str | None = None
    reward_base_url: str | None = None
    reward_model: str | None = None      # None: the first model the reward server lists
    reward_api_key: str | None = None    # None: api_key
    reward_format: str = "n4"            # n4: POST {base}/rewards; chat: content "helpfulness:1.26,..."
    tasks: tuple[str, ...] = TASKS
    num_prompts: int = 10                # per task
    responses_per_prompt: int = 2
    concurrency: int = 8
    temperature: float = 0.7
    max_tokens: int = 512                # per response
    prompt_max_tokens: int = 256         # per call that writes a topic list, question, passage or follow-up
    seed: int = 0
    min_reward: float | None = None
    min_margin: float = 0.0
    keep_truncated: bool = False
    refine: bool = True  # open Q&A and writing requests are revised once by the generator (the report's step)
    topics_file: str | None = None
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 600.0
    stop_after: str = "pairs"

    def __post_init__(self):
        self._check_urls()
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                             f"{','.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks: a task is listed twice: {','.join(self.tasks)}")
        self._check_numbers()
        if self.reward_format not in REWARD_FORMATS:
            raise ValueError(f"--reward-format must be one of {', '.join(REWARD_FORMATS)}, got {self.reward_format!r}")
        if self.stop_after not in STAGES:
            raise ValueError(f"--stop-after must be one of {', '.join(STAGES)}, got {self.stop_after!r}")
        if self.needs_reward and not self.reward_base_url:
            raise ValueError("--reward-base-url is required to score responses (or stop earlier with "
                             "--stop-after responses)")
        if self.topics_file is not None:
            self._check_topics_file()

    def _check_topics_file(self) -> None:
        if not os.path.isfile(self.topics_file):
            raise ValueError(f"--topics: no such file: {self.topics_file}")
        # A file without a topic made every generator-written slot skip silently ("skipped_without_topics") and the
        # run exit 0 with only math's local problems.
        try:
            with open(self.topics_file, encoding="utf-8") as f:
                has_topic = any(line.strip() for line in f)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--topics {self.topics_file}: cannot read it as UTF-8 text ({e})") from None
        if not has_topic:
            raise ValueError(f"--topics {self.topics_file}: the file holds no topic (one per line)")

    def _check_urls(self) -> None:
        for flag, url in (("--base-url", self.base_url), ("--reward-base-url", self.reward_base_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{flag} must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")

    def _check_numbers(self) -> None:
        positive = {"--num-prompts": self.num_prompts, "--concurrency": self.concurrency,
                    "--max-tokens": self.max_tokens, "--prompt-max-tokens": self.prompt_max_tokens}
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if not isinstance(self.responses_per_prompt, int) or self.responses_per_prompt < 2:
            raise ValueError(f"--responses-per-prompt must be at least 2 (a preference pair needs two responses), "
                             f"got {self.responses_per_prompt!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"--retries must be a non-negative integer, got {self.retries!r}")
        # isfinite first: NaN passes every comparison below and would reach the server.
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise ValueError(f"--temperature must be between 0 and 2, got {self.temperature!r}")
        if not math.isfinite(self.min_margin) or self.min_margin < 0:
            raise ValueError(f"--min-margin must be a finite number >= 0, got {self.min_margin!r}")
        if self.min_reward is not None and not math.isfinite(self.min_reward):
            raise ValueError(f"--min-reward must be a finite number, got {self.min_reward!r}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout_s!r}")
        if not math.isfinite(self.backoff_s) or self.backoff_s < 0:
            raise ValueError(f"backoff must be a finite number >= 0, got {self.backoff_s!r}")

    @property
    def needs_reward(self) -> bool:
        return STAGES.index(self.stop_after) >= STAGES.index("scores")

    def path(self, name: str) -> str:
        return os.path.join(self.output, name)

    def public(self) -> dict:
        """The settings for summary.json: everything but the keys."""
        hidden = {"api_key", "reward_api_key"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k not in hidden}
