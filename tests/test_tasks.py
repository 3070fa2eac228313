import pytest

from bench.evals.tasks import TASKS, make_sample, score


class WordTokenizer:
    """Stands in for a real tokenizer: one token per whitespace-separated word."""

    def __call__(self, text):
        return type("Enc", (), {"input_ids": text.split()})()


TOK = WordTokenizer()


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_for_a_seed(task):
    a, b = make_sample(task, 2000, TOK, seed=3), make_sample(task, 2000, TOK, seed=3)
    assert a == b
    assert make_sample(task, 2000, TOK, seed=4).prompt != a.prompt


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n_tokens", [500, 4000])
def test_length_close_to_the_budget(task, n_tokens):
    s = make_sample(task, n_tokens, TOK, seed=0)
    assert 0.9 * n_tokens <= s.n_tokens <= n_tokens


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_the_requested_depth(depth):
    s = make_sample("passkey", 3000, TOK, seed=1, depth=depth)
    key = s.answers[0]
    start, end = s.prompt.index("\n\n") + 2, s.prompt.rindex("\n\n")  # the haystack
    at = s.prompt.index(f"The pass key is {key}")
    assert abs((at - start) / (end - start) - depth) < 0.02


@pytest.mark.parametrize("depth", [0.0, 0.002, 0.3])  # near 0 the chain's places tie: it came out reversed there
def test_variable_tracking_chain_is_in_order(depth):
    s = make_sample("variable_tracking", 3000, TOK, seed=2, depth=depth)
    names = s.answers
    spots = [s.prompt.index(f"VAR {n} =") for n in names]
    assert spots == sorted(spots)
    assert f"VAR {names[1]} = VAR {names[0]}." in s.prompt


@pytest.mark.parametrize("depth", [0.0, 0.4, 0.8])
def test_variable_tracking_chain_begins_at_the_depth_and_runs_on_after_it(depth):
    s = make_sample("variable_tracking", 3000, TOK, seed=2, depth=depth)
    start, end = s.prompt.index("\n\n") + 2, s.prompt.rindex("\n\n")  # the haystack
    at = [(s.prompt.index(f"VAR {n} =") - start) / (end - start) for n in s.answers]
    assert abs(at[0] - depth) < 0.02 and s.depth == depth
    assert at[-1] > depth + (1 - depth) / 2 and at == sorted(at)


def test_score_accepts_the_right_answer_and_rejects_others():
    s = make_sample("passkey", 800, TOK, seed=5)
    key = s.answers[0]
    assert score(s, f" {key}. The pass key is") == 1.0
    assert score(s, " 12345") == 0.0 or key == "12345"
    assert score(s, f" {key}7") == 0.0  # a longer number is not the key


def test_multivalue_scores_the_fraction_found():
    s = make_sample("niah_multivalue", 800, TOK, seed=0)
    assert len(s.answers) == 4 and len(set(s.answers)) == 4
    assert score(s, ", ".join(s.answers[:3])) == pytest.approx(0.75)


def test_multikey_question_names_one_of_the_needles():
    s = make_sample("niah_multikey", 800, TOK, seed=0)
    assert s.prompt.count("One of the special magic numbers for") == 4
    assert s.answers[0] in s.prompt


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        make_sample("needle", 100, TOK)
    with pytest.raises(ValueError, match="depth must lie in"):
        make_sample("passkey", 100, TOK, depth=1.5)


def test_multiquery_asks_for_every_needle():
    s = make_sample("niah_multiquery", 1500, TOK, seed=2)
    assert len(s.answers) == 4 and s.prompt.count("One of the special magic numbers for") == 4
    question = s.prompt[s.prompt.rindex("\n\n") :]
    for value in s.answers:
        needle = s.prompt[: s.prompt.index(value)]
        word = needle[needle.rindex("numbers for ") + len("numbers for ") :].split()[0]
        assert word in question  # the question names the key of every value it expects
    assert score(s, " ".join(s.answers[:2])) == pytest.approx(0.5)


@pytest.mark.parametrize("n_tokens", [500, 4000])
def test_common_words_are_the_most_frequent_in_the_list(n_tokens):
    from collections import Counter

    s = make_sample("common_words", n_tokens, TOK, seed=1)
    listed = s.prompt[s.prompt.index("1. ") : s.prompt.rindex("\nQuestion")].split()[1::2]
    counts = Counter(listed)
    assert len(s.answers) == 10 and set(s.answers) <= set(counts)
    fewest_common = min(counts[w] for w in s.answers)
    assert fewest_common > max(c for w, c in counts.items() if w not in s.answers)
    assert score(s, ", ".join(s.answers)) == 1.0 and score(s, "none of them") == 0.0
