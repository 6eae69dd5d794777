"""benchmarks/gpu_model.py's step breakdown on the CPU: phases are timed and the engine is left as it was."""
from __future__ import annotations

from benchmarks.gpu_model import _engine, step_phases
from server.engine.sampling import SamplingParams


def _greedy(engine, prompt: list[int], tokens: int) -> list[int]:
    engine.add_request("probe", prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.extend(o.new_token_ids)
    return out


def test_step_phases_times_each_phase_and_unpatches():
    engine, _ = _engine("tiny", [1, 3], "torch", "float32", "cpu", "auto", 256, 256)
    prompt = list(range(10, 30))
    before = _greedy(engine, prompt, 6)
    result = step_phases(engine, 3, 12, 5)
    assert result["batch"] == 3 and result["steps"] == 5
    phases = result["phases_ms"]
    assert set(phases) == {"schedule", "prepare_inputs", "forward", "lm_head", "sample", "other"}
    assert all(phases[name] > 0 for name in ("schedule", "prepare_inputs", "forward", "lm_head", "sample"))
    assert abs(sum(phases.values()) - result["ms_per_step_with_syncs"]) < 1e-2
    assert not engine.has_unfinished_requests()          # its own requests ran to the end
    # Nothing of the timers is left on the engine: the class methods are back and the outputs are unchanged.
    assert "schedule" not in vars(engine.scheduler) and "compute_logits" not in vars(engine.runner.model)
    assert "forward" not in vars(engine.runner.model) and type(engine.runner.sampler).__name__ == "Sampler"
    assert _greedy(engine, prompt, 6) == before
