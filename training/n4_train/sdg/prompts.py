"""What the generator is asked, and the seeded material used when its answer does not parse.

The meta-prompts follow the 340B report's prompt-generation recipe: ask for topics of a macro topic, then for a
question / instruction / problem about one topic; closed Q&A pairs a passage with a templated instruction about it;
two-turn prompts have the model play the user writing a follow-up. A weak generator (the demo model writes
gibberish) must not stop the pipeline, so every step has a seeded fallback and records which one was used."""
from __future__ import annotations

import re

GENERAL_MACROS = ("science", "history", "economics", "health and medicine", "technology", "arts and culture",
                  "sports", "geography", "philosophy", "everyday life", "the environment", "education")
MACROS = {"open_qa": GENERAL_MACROS, "writing": GENERAL_MACROS, "closed_qa": GENERAL_MACROS,
          "math": ("arithmetic", "algebra", "geometry", "probability", "statistics", "number theory", "calculus",
                   "combinatorics"),
          "coding": ("data structures", "algorithms", "string processing", "file handling", "recursion",
                     "sorting and searching", "object-oriented design", "dynamic programming")}

_GENERAL_TOPICS = ("photosynthesis", "the printing press", "inflation", "sleep and memory", "renewable energy",
                   "the Silk Road", "volcanoes", "vaccines", "the history of jazz", "urban gardening",
                   "black holes", "the Roman Republic", "supply chains", "coral reefs", "the Olympic Games",
                   "personal budgeting", "machine translation", "ancient Egyptian writing", "recycling",
                   "public libraries")
SEED_TOPICS = {"open_qa": _GENERAL_TOPICS, "writing": _GENERAL_TOPICS, "closed_qa": _GENERAL_TOPICS,
               "math": ("fractions", "percentages", "linear equations", "area of a triangle", "prime numbers",
                        "averages", "simple interest", "ratios", "the Pythagorean theorem", "dice probabilities",
                        "arithmetic sequences", "unit conversion"),
               "coding": ("binary search", "reversing a linked list", "counting word frequencies",
                          "validating parentheses", "merging sorted lists", "parsing CSV lines", "memoization",
                          "matrix transposition", "finding duplicates in a list", "run-length encoding",
                          "stacks and queues", "depth-first search")}
WRITING_FORMS = ("poem", "short story", "newsletter", "product description", "essay", "speech", "blog post",
                 "letter", "advertisement", "diary entry")

TOPICS_PROMPT = ("Can you generate {n} diverse topics related to {macro}? Write one topic per line, with no "
                 "numbering and no explanations.")
QUESTION_PROMPTS = {
    "open_qa": ("Can you generate one question about the following topic? The question should be specific and "
                "answerable in a few paragraphs.\nTopic: {topic}\nReply with the question only."),
    "writing": ("Can you generate one instruction that asks to write a {form} about the following topic? Say what "
                "the {form} should cover.\nTopic: {topic}\nReply with the instruction only."),
    "math": ("Can you generate one math problem related to the following topic? It should take a few steps to "
             "solve and have a single numerical answer.\nTopic: {topic}\nReply with the problem only."),
    "coding": ("Can you generate one Python coding problem related to the following topic? State the inputs and "
               "the expected output.\nTopic: {topic}\nReply with the problem statement only."),
}
# The report's second step for open Q&A and writing: the generator revises its own request to be more detailed and
# specific (a generated request tends to be short and generic).
REFINE_PROMPT = ("Please revise the following {what} to make it more detailed and specific, keeping what it asks "
                 "for.\n{label}: {request}\nReply with the revised {what} only.")
REFINED_TASKS = {"open_qa": ("question", "Question"), "writing": ("instruction", "Instruction")}
PASSAGE_PROMPT = ("Write a short factual passage (one paragraph of about 100 words) about the following topic.\n"
                  "Topic: {topic}\nReply with the passage only.")
FOLLOWUP_PROMPT = ("Here is a conversation between a user and an AI assistant.\n\nUser: {question}\n\n"
                   "Assistant: {answer}\n\nPlease write the user's next message: a follow-up question or request "
                   "that builds on the assistant's answer. Reply with that message only.")

# Closed Q&A instructions about a given document, templated as in the report (it used C4 documents).
CLOSED_QA_INSTRUCTIONS = ("Summarize the text above in two sentences.", "What is the main point of the text above?",
                          "List the key facts stated in the text above.",
                          "Based only on the text above, what can be concluded about {topic}?",
                          "Rewrite the text above so that a ten-year-old can understand it.",
                          "What questions does the text above leave unanswered?")
FALLBACK_QUESTIONS = {
    "open_qa": ("What are the most important things to know about {topic}?",
                "How has our understanding of {topic} changed over the last century?",
                "Why does {topic} matter in everyday life?", "What are common misconceptions about {topic}?"),
    "writing": ("Write a {form} about {topic}.", "Write a {form} about {topic} for a general audience.",
                "Write a humorous {form} about {topic}."),
    "math": ("Explain, with a worked example, how to solve a typical problem about {topic}.",
             "Make up a word problem about {topic}, solve it step by step and state the final answer."),
    "coding": ("Write a Python function for a typical task involving {topic}, and explain its time complexity.",
               "Explain {topic} and show a short, tested Python example."),
}
FALLBACK_FOLLOWUPS = ("Can you explain that in more detail?", "Can you give a concrete example?",
                      "Can you summarize your answer in one sentence?", "What are the main counterarguments?",
                      "How would you explain this to a beginner?")
# (topic, passage) for closed Q&A when the generator's passage does not parse; written for this file.
FALLBACK_PASSAGES = (
    ("tides", "Tides are the regular rise and fall of the sea. They are caused mainly by the Moon's gravity, which "
              "pulls the ocean on the near side of the Earth toward it, while the Earth itself is pulled slightly "
              "away from the water on the far side. Most coasts see two high tides and two low tides a day. When the "
              "Sun and Moon line up, their pulls add and produce larger spring tides."),
    ("honeybees", "A honeybee colony has one queen, thousands of female workers and, in summer, a few hundred "
                  "males called drones. Workers change jobs as they age: young bees clean cells and feed larvae, "
                  "older ones build comb and guard the entrance, and the oldest forage for nectar and pollen. "
                  "Foragers tell nestmates where food is through a waggle dance whose angle points the direction."),
    ("the telegraph", "The electric telegraph sent messages as pulses of current along a wire. Operators used "
                      "Morse code, in which letters are short and long signals. By the 1860s cables crossed "
                      "continents and, after several failures, the Atlantic Ocean, cutting the time for news to "
                      "travel between Europe and America from about ten days to minutes."),
    ("compound interest", "Compound interest is interest earned on both the original deposit and on interest "
                          "already added. A deposit of 1000 dollars at 5 percent a year grows to 1050 dollars after "
                          "one year and to about 1629 dollars after ten years, whereas simple interest would give "
                          "1500 dollars. The more often interest is added, the faster the balance grows."),
    ("deserts", "Deserts are regions that receive less than about 250 millimeters of rain a year. Not all are hot: "
                "Antarctica is the largest desert on Earth. Desert plants such as cacti store water in thick stems, "
                "and many animals rest during the day and come out at night, when it is cooler."),
    ("the immune system", "The immune system defends the body against infection. Its innate part reacts within "
                          "hours to anything that looks foreign. Its adaptive part, made of B cells and T cells, "
                          "learns to recognize a specific germ; this takes days the first time, but memory cells "
                          "let the body respond much faster when the same germ returns, which is how vaccines work."),
)

_NUMBERING = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.):]|[a-zA-Z][.)])\s+")
_LABEL = re.compile(r"^\s*(?:topic|question|instruction|problem|task|passage|user)\s*\d*\s*:\s*", re.IGNORECASE)


def clean_line(line: str) -> str:
    """Strip list numbering, bullets, a 'Question:'-style label and surrounding quotes or bold markers."""
    line = _LABEL.sub("", _NUMBERING.sub("", line.strip()))
    return line.strip().strip('"*“”').strip()


def looks_like_text(text: str, min_words: int, max_words: int) -> bool:
    """A cheap check that model output is prose, not token soup: word count in bounds, mostly letters, no word
    longer than 24 characters and no replacement characters. (It admits only Latin-script text; the seeded
    fallbacks are English too.)"""
    words = text.split()
    if not min_words <= len(words) <= max_words or "\ufffd" in text:
        return False
    if max(len(w) for w in words) > 24:
        return False
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters >= 0.7 * len(visible) and all(c.isprintable() for c in visible)


def parse_topics(text: str, wanted: int) -> list[str]:
    """Distinct topics of 1-8 words, one per line; [] when fewer than min(3, wanted) lines qualify."""
    topics: list[str] = []
    for line in text.splitlines():
        topic = clean_line(line).rstrip(".")
        if looks_like_text(topic, 1, 8) and topic.lower() not in {t.lower() for t in topics}:
            topics.append(topic)
    return topics[:wanted] if len(topics) >= min(3, wanted) else []


def parse_request(text: str, task: str) -> str | None:
    """The first paragraph as a user request (question, instruction, problem), or None when it does not parse.
    An open Q&A question must contain a question mark."""
    paragraphs = [clean_line(p) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if not paragraphs:
        return None
    request = paragraphs[0]
    if not looks_like_text(request, 4, 200) or (task == "open_qa" and "?" not in request):
        return None
    return request


def parse_passage(text: str) -> str | None:
    passage = text.strip()
    return passage if looks_like_text(passage, 20, 400) else None
