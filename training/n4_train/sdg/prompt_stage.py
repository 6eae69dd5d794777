"""Stage 1: topics.jsonl and prompts.jsonl.

A prompt is made for each slot (task, index). Slots, not content ids, decide what a rerun still has to do, because
the generator's text (and so the content id) may differ between runs; a slot with a record is done. Math splits its
slots: the first half asks the generator for problems, the rest are local word problems with a checked answer."""
from __future__ import annotations

import math

from n4_train.sdg import prompts as P
from n4_train.sdg.client import chat, first_text
from n4_train.sdg.config import KINDS, TASKS
from n4_train.sdg.errors import RequestFailed
from n4_train.sdg.instructions import sample_instruction
from n4_train.sdg.math_problems import generate_problem
from n4_train.sdg.records import JsonlAppender, stable_id
from n4_train.sdg.state import RunState, run_all

TOPICS_PER_CALL = 5


def model_slots(task: str, num_prompts: int) -> int:
    """How many of a task's slots ask the generator; for math the rest are local problems with answers."""
    return num_prompts // 2 if task == "math" else num_prompts


def slot_kind(task: str, index: int, local_math: bool) -> str:
    """Kinds rotate over slots (offset per task, so even 2 prompts per task cover all kinds across tasks). A local
    math problem is never two-turn: the last user turn would be a follow-up the ground truth does not answer."""
    if local_math:
        return KINDS[index % 2]
    return KINDS[(index + TASKS.index(task)) % len(KINDS)]


async def _ask(state: RunState, content: str, step: tuple) -> str:
    response = await chat(state.generator, state.model, [{"role": "user", "content": content}],
                          temperature=state.config.temperature, max_tokens=state.config.prompt_max_tokens,
                          seed=state.seed_for(*step))
    return first_text(response)[0]


# ---- topics ------------------------------------------------------------------------------------------------------
async def _topic_batch(state: RunState, task: str, batch: int, out: JsonlAppender) -> None:
    rng = state.rng("topics", task, batch)
    macro = rng.choice(P.MACROS[task])
    try:
        text = await _ask(state, P.TOPICS_PROMPT.format(n=TOPICS_PER_CALL, macro=macro), ("topics", task, batch))
    except RequestFailed as e:
        state.fail("topics", f"{task}/{batch}", e)  # no record: this batch's slots wait for a rerun
        return
    topics, source = P.parse_topics(text, TOPICS_PER_CALL), "model"
    if not topics:
        topics, source = rng.sample(P.SEED_TOPICS[task], TOPICS_PER_CALL), "fallback"
    out.write({"id": f"{task}/{batch}", "task": task, "macro": macro, "topics": topics, "source": source})


async def load_topics(state: RunState) -> dict[str, list[str]]:
    """task/batch -> topics, generating the batches not in topics.jsonl (or every topic from --topics FILE)."""
    config = state.config
    if config.topics_file:
        with open(config.topics_file, encoding="utf-8") as f:
            topics = [line.strip() for line in f if line.strip()]
        return {"file": topics}
    with JsonlAppender(config.path("topics.jsonl")) as out:
        wanted = [(task, b) for task in config.tasks
                  for b in range(math.ceil(model_slots(task, config.num_prompts) / TOPICS_PER_CALL))]
        todo = [(task, b) for task, b in wanted if f"{task}/{b}" not in out.ids]
        await run_all((_topic_batch(state, task, b, out) for task, b in todo), len(todo), "topics")
        return {r["id"]: r["topics"] for r in out.records}


def slot_topic(topics: dict[str, list[str]], task: str, index: int) -> str | None:
    if "file" in topics:
        return topics["file"][index % len(topics["file"])] if topics["file"] else None
    batch = topics.get(f"{task}/{index // TOPICS_PER_CALL}")
    return batch[index % TOPICS_PER_CALL % len(batch)] if batch else None


# ---- one prompt ----------------------------------------------------------------------------------------------------
async def _first_turn(state: RunState, task: str, index: int, topic: str) -> tuple[str, str, str]:
    """(user message, topic, source) of a generator-written prompt."""
    rng = state.rng("first", task, index)
    if task == "closed_qa":
        passage = P.parse_passage(await _ask(state, P.PASSAGE_PROMPT.format(topic=topic), ("passage", task, index)))
        source = "model"
        if passage is None:
            (topic, passage), source = rng.choice(P.FALLBACK_PASSAGES), "fallback"
        instruction = rng.choice(P.CLOSED_QA_INSTRUCTIONS).format(topic=topic)
        return f"{passage}\n\n{instruction}", topic, source
    form = rng.choice(P.WRITING_FORMS)
    text = await _ask(state, P.QUESTION_PROMPTS[task].format(topic=topic, form=form), ("question", task, index))
    request = P.parse_request(text, task)
    if request is not None:
        return await _refined(state, task, index, request), topic, "model"
    return rng.choice(P.FALLBACK_QUESTIONS[task]).format(topic=topic, form=form), topic, "fallback"


async def _refined(state: RunState, task: str, index: int, request: str) -> str:
    """The generator's revision of its own request, when refinement applies and the revision parses."""
    if not state.config.refine or task not in P.REFINED_TASKS:
        return request
    what, label = P.REFINED_TASKS[task]
    text = await _ask(state, P.REFINE_PROMPT.format(what=what, label=label, request=request), ("refine", task, index))
    revised = P.parse_request(text, task)
    state.note("prompts", "refined" if revised is not None else "refinement_unparsed")
    return revised if revised is not None else request


async def _two_turn(state: RunState, record: dict, index: int) -> None:
    """Answer the first turn, then have the generator play the user and write a follow-up."""
    question = record["messages"][0]["content"]
    answer = (await _ask(state, question, ("answer", record["task"], index))).strip()
    if not answer:  # nothing to follow up on; keep the prompt as a single turn
        record["kind"] = "single_turn"
        state.note("prompts", "two_turn_without_answer")
        return
    text = await _ask(state, P.FOLLOWUP_PROMPT.format(question=question, answer=answer),
                      ("followup", record["task"], index))
    followup, source = P.parse_request(text, "followup"), "model"
    if followup is None:
        followup, source = state.rng("followup", record["task"], index).choice(P.FALLBACK_FOLLOWUPS), "fallback"
    record["messages"] += [{"role": "assistant", "content": answer}, {"role": "user", "content": followup}]
    record["followup_source"] = source


async def make_prompt(state: RunState, task: str, index: int, topics: dict[str, list[str]]) -> dict | None:
    """The prompt record of one slot; None when it cannot be made this run (a request failed, or its topics)."""
    local_math = task == "math" and index >= model_slots(task, state.config.num_prompts)
    record = {"slot": f"{task}/{index}", "task": task, "kind": slot_kind(task, index, local_math)}
    if local_math:
        text, answer, template = generate_problem(state.rng("math", index))
        record.update(messages=[{"role": "user", "content": text}], topic=template, source="template", answer=answer)
    else:
        topic = slot_topic(topics, task, index)
        if topic is None:
            state.note("prompts", "skipped_without_topics")
            return None
        user, topic, source = await _first_turn(state, task, index, topic)
        record.update(messages=[{"role": "user", "content": user}], topic=topic, source=source)
    if record["kind"] == "instruction_following":
        record["instruction"] = sample_instruction(state.rng("instruction", task, index))
        record["messages"][-1]["content"] += "\n\n" + record["instruction"]["text"]
    elif record["kind"] == "two_turn":
        await _two_turn(state, record, index)
    record["seed"] = state.config.seed
    record["id"] = stable_id(record["messages"], record.get("answer"), record.get("instruction"), record["seed"])
    return dict(id=record.pop("id"), **record)


async def _slot(state: RunState, task: str, index: int, topics, out: JsonlAppender) -> None:
    try:
        record = await make_prompt(state, task, index, topics)
    except RequestFailed as e:
        state.fail("prompts", f"{task}/{index}", e)
        return
    if record is None:
        return
    if record["id"] in out.ids:
        # The same content as another slot's (a fallback template drew the same words). It is written, so the slot
        # counts as done and a rerun does not ask again, but marked, so later stages use one copy only.
        first = record.pop("id")
        record = {"id": stable_id(first, record["slot"]), "duplicate_of": first, **record}
        state.note("prompts", "duplicates")
    out.write(record)


async def run_prompt_stage(state: RunState) -> list[dict]:
    """This run's prompt records, duplicates (marked `duplicate_of`) included."""
    config = state.config
    topics = await load_topics(state)
    with JsonlAppender(config.path("prompts.jsonl")) as out:
        done = {r["slot"] for r in out.existing}
        todo = [(task, i) for task in config.tasks for i in range(config.num_prompts) if f"{task}/{i}" not in done]
        await run_all((_slot(state, task, i, topics, out) for task, i in todo), len(todo), "prompts")
        state.note("prompts", "written", out.written)
        # Only this run's slots go on: a rerun with fewer tasks or prompts leaves the other records in the file.
        wanted = {f"{task}/{i}" for task in config.tasks for i in range(config.num_prompts)}
        return [r for r in out.records if r["slot"] in wanted]
