"""Long-context test prompts generated locally from a seed (nothing is downloaded).

Passkey retrieval (after Landmark Attention) and RULER-style tasks: needles
(single, multi-key with distractors, multi-value, multi-query), variable
tracking, and common-words extraction (aggregation). A needle prompt is a
haystack of filler sentences sized to a token budget with the needles at
chosen depths; a common-words prompt is a numbered word list of that size.
Every prompt ends in an answer prefix so that a base or small instruct model
completes it. `score()` is exact string matching (whole words).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TASKS = (
    "passkey",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_WORDS = (
    "apple",
    "river",
    "lantern",
    "falcon",
    "meadow",
    "copper",
    "violin",
    "glacier",
    "harbor",
    "orchid",
    "pepper",
    "canyon",
    "marble",
    "thunder",
    "willow",
    "saffron",
    "beacon",
    "quartz",
    "tundra",
    "ember",
)


# The most tokens an answer is given, per task (greedy decoding stops there or at an EOS token).
MAX_NEW = {
    "passkey": 8,
    "niah_single": 12,
    "niah_multikey": 12,
    "niah_multivalue": 40,
    "niah_multiquery": 40,
    "variable_tracking": 30,
    "common_words": 50,
}


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answers: tuple[str, ...]  # every one must appear in the output
    depth: float  # where the (first) needle sits, as a fraction of the haystack
    n_tokens: int  # prompt tokens


def make_sample(task: str, n_tokens: int, tokenizer, *, seed: int = 0, depth: float | None = None) -> Sample:
    """A prompt of about `n_tokens` tokens for `task`, deterministic for (task, n_tokens, seed, depth)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = random.Random(f"{task}/{n_tokens}/{seed}/{depth}")
    depth = rng.random() if depth is None else depth
    if task == "common_words":
        return _common_words(n_tokens, tokenizer, rng, depth)
    intro, needles, question, answers = _TASK_PARTS[task](rng)
    fixed = len(tokenizer(intro + " ".join(needles) + question).input_ids)
    per_unit = len(tokenizer(" " + FILLER).input_ids)
    units = max(1, (n_tokens - fixed) // per_unit)
    # The first needle goes at `depth`; the others spread after it (variable
    # tracking's chain must stay in order) or at random depths (distractors).
    if task == "variable_tracking":
        places = [round((depth + (1 - depth) * i / len(needles)) * units) for i in range(len(needles))]
    else:
        places = [round(depth * units)] + [rng.randrange(units + 1) for _ in needles[1:]]
    pieces = [FILLER] * units
    # from the last place to the first, and at a place two needles share the later first: each stays after the one
    # before it (a chain's order held only where its places differed)
    for _, place, needle in sorted(zip(range(len(needles)), places, needles), key=lambda t: (t[1], t[0]), reverse=True):
        pieces.insert(place, needle)
    prompt = intro + " ".join(pieces) + question
    return Sample(task, prompt, tuple(answers), depth, len(tokenizer(prompt).input_ids))


def cell_sample(task: str, context: int, tok, i: int, n: int, first: int = 0) -> Sample:
    """Prompt i of an evaluation cell's n (a task at a context length): seed first + i, the
    needle depths spread evenly over the n. The one place a cell's prompts are made, so that
    every evaluation of a cell, and a later run over further seeds, asks the same questions."""
    return make_sample(task, context, tok, seed=first + i, depth=(i + 0.5) / n)


def score(sample: Sample, output: str) -> float:
    """Fraction of the expected answers found in the output as whole words."""
    found = sum(bool(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", output)) for a in sample.answers)
    return found / len(sample.answers)


# ------------------------------------------------------------------ the tasks


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _passkey(rng):
    key = _number(rng, 5)
    intro = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n"
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return intro, [needle], "\n\nWhat is the pass key? The pass key is", [key]


_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)


def _needle(word: str, value: str) -> str:
    return f"One of the special magic numbers for {word} is: {value}."


def _question(word: str, plural: bool = False) -> str:
    if plural:  # `word` may name several keys: "apple, river and ember"
        return (
            f"\n\nWhat are all the special magic numbers for {word} mentioned in the provided text? "
            f"The special magic numbers for {word} mentioned in the provided text are"
        )
    return (
        f"\n\nWhat is the special magic number for {word} mentioned in the provided text? "
        f"The special magic number for {word} mentioned in the provided text is"
    )


def _niah_single(rng):
    word, value = rng.choice(KEY_WORDS), _number(rng, 7)
    return _NIAH_INTRO, [_needle(word, value)], _question(word), [value]


def _niah_multikey(rng):
    words = rng.sample(KEY_WORDS, 4)
    values = [_number(rng, 7) for _ in words]
    needles = [_needle(w, v) for w, v in zip(words, values)]
    return _NIAH_INTRO, needles, _question(words[0]), [values[0]]


def _niah_multivalue(rng):
    word = rng.choice(KEY_WORDS)
    values = [_number(rng, 7) for _ in range(4)]
    return _NIAH_INTRO, [_needle(word, v) for v in values], _question(word, plural=True), values


def _niah_multiquery(rng):
    words = rng.sample(KEY_WORDS, 4)
    values = [_number(rng, 7) for _ in words]
    needles = [_needle(w, v) for w, v in zip(words, values)]
    return _NIAH_INTRO, needles, _question(", ".join(words[:-1]) + " and " + words[-1], plural=True), values


def _variable_tracking(rng):
    value = _number(rng, 5)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = (
        f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
        f"variables are assigned the value {value}, they are:"
    )
    return intro, needles, question, names


_TASK_PARTS = {
    "passkey": _passkey,
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "variable_tracking": _variable_tracking,
}

# Common-words extraction (RULER's aggregation task): a numbered list in which N_COMMON
# words appear often and every other word RARE_FREQ times. The common words fill about a
# quarter of the list (RULER: 10 words 30 times in about 1,200 entries at 4K tokens), at
# most COMMON_FREQ times each.
N_COMMON, COMMON_FREQ, RARE_FREQ = 10, 30, 3
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    """n distinct pronounceable made-up words (no vocabulary file needed)."""
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def _word_list(rng: random.Random, entries: int) -> tuple[list[str], list[str]]:
    """(the list, its common words) for about `entries` entries."""
    freq = max(RARE_FREQ + 1, min(COMMON_FREQ, entries // (4 * N_COMMON)))
    n_rare = max(0, entries - N_COMMON * freq) // RARE_FREQ
    words = _pseudo_words(rng, N_COMMON + n_rare)
    rng.shuffle(words)
    common, rare = words[:N_COMMON], words[N_COMMON:]
    listed = [w for w in common for _ in range(freq)] + [w for w in rare for _ in range(RARE_FREQ)]
    rng.shuffle(listed)
    return listed, common


def _common_words(n_tokens: int, tokenizer, rng: random.Random, depth: float) -> Sample:
    intro = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    question = (
        f"\nQuestion: What are the {N_COMMON} most common words in the above list? "
        f"Answer: The top {N_COMMON} words that appear most often in the list are:"
    )
    fixed = len(tokenizer(intro + question).input_ids)
    seed = rng.random()
    entries = max(1, (n_tokens - fixed) // 4)
    for _ in range(6):  # size the list by measuring it: words split into varying numbers of tokens
        listed, common = _word_list(random.Random(seed), entries)
        prompt = intro + " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)) + question
        n = len(tokenizer(prompt).input_ids)
        if 0.95 * n_tokens <= n <= n_tokens:
            break
        entries = max(1, int(entries * 0.98 * (n_tokens - fixed) / max(1, n - fixed)))
    return Sample("common_words", prompt, tuple(common), depth, n)
