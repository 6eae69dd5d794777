"""`n4 generate` and CLI errors: output on stdout, a one-line message and a non-zero exit on bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from n4.cli import main


def _n4(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "n4.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_is_deterministic_when_greedy():
    first = _n4("generate", "--prompt", "The answer is", "--max-tokens", "6")
    second = _n4("generate", "--prompt", "The answer is", "--max-tokens", "6")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and first.stdout == second.stdout
    assert "6 generated, finish reason length" in first.stderr


@pytest.mark.parametrize("args, message", [
    (["serve", "--model", "/nonexistent/dir"], "neither a checkpoint directory nor a preset"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--prompt", "x", "--max-model-len", "999999"], "exceeds the model's max_position_embeddings"),
    (["serve", "--max-queue-len", "0"], "--max-queue-len must be a positive integer"),
    (["serve", "--shutdown-timeout", "nan"], "--shutdown-timeout must be a non-negative number"),
    (["serve", "--max-request-body-bytes", "-1"], "--max-request-body-bytes must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("n4 ")]
    assert len(err_lines) == 1 and message in err_lines[0]
