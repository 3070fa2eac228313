"""A conversation (engine.conversation, `hybridattn chat`): each turn prefills only what is new to it,
the messages so far kept in one cache, and answers as the whole conversation prefilled would."""

import io

import pytest

from engine import OffloadConfig
from engine.api import HybridLLM
from engine.cli import main
from tests.conftest import tiny_llama
from tests.test_attention import COVER_ALL

NEW = 10


@pytest.fixture(scope="module")
def llm(bundled_tokenizer):
    """A budget that covers every host token: a turn answered from the kept cache is then the whole
    conversation's answer, token for token."""
    cfg = OffloadConfig(device="cpu", **COVER_ALL, host_dtype="float32", prefill_chunk=64)
    return HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, cfg)


def test_each_turn_prefills_only_what_is_new_and_answers_as_the_whole_conversation(llm):
    system = [{"role": "system", "content": "Answer briefly."}]
    chat = llm.conversation(system)
    questions = ["The grass is green and the sky is blue. " * 20 + "What is green?", "And blue?", "Thanks."]
    try:
        for i, question in enumerate(questions):
            before = chat.kept_tokens
            whole = llm.generate([*chat.messages, {"role": "user", "content": question}], NEW, progress=False)
            prompt_tokens = len(llm.encode([*chat.messages, {"role": "user", "content": question}])[0])
            got = chat.ask(question, NEW, progress=False) if i != 1 else None
            if got is None:  # the second turn streamed
                got_text = "".join(chat.stream(question, NEW, progress=False))
            else:
                got_text = got.text
                assert got.report.prompt_tokens == prompt_tokens
            assert got_text == whole.text
            assert chat.found_kept == before  # the turn before's prompt, all of it found
            assert chat.kept_tokens == prompt_tokens - 1  # this turn's kept for the next: all but its last token
            assert chat.messages[-2:] == [
                {"role": "user", "content": question},
                {"role": "assistant", "content": got_text},
            ]
        assert chat.messages[0] == system[0] and len(chat.messages) == 7
    finally:
        chat.close()
    assert chat.kept_tokens == 0


def test_a_stream_stopped_early_keeps_what_it_showed(llm):
    chat = llm.conversation()
    try:
        pieces = chat.stream("Tell me a long story about the sea and the sky.", 40, progress=False, stop_at_eos=False)
        shown = next(pieces)
        pieces.close()
        assert chat.messages[-1] == {"role": "assistant", "content": shown}
        again = chat.ask("Go on.", 4, progress=False)  # the conversation goes on from there
        assert again.report.prompt_tokens > chat.found_kept > 0
    finally:
        chat.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_turn_that_fails_leaves_the_conversation_as_it_was(llm, streamed):
    """A question asked again after an error is asked once: no user message without its answer is left."""
    chat = llm.conversation([{"role": "system", "content": "Answer briefly."}])
    try:
        chat.ask("What is green?", 4, progress=False)
        before = list(chat.messages)
        with pytest.raises(ValueError, match="temperature"):
            if streamed:
                list(chat.stream("And blue?", 4, temperature=-1.0, progress=False))
            else:
                chat.ask("And blue?", 4, temperature=-1.0, progress=False)
        assert chat.messages == before
        again = chat.ask("And blue?", 4, progress=False)
        whole = llm.generate([*before, {"role": "user", "content": "And blue?"}], 4, progress=False)
        assert again.text == whole.text and [m["role"] for m in chat.messages[-3:]] == [
            "assistant",
            "user",
            "assistant",
        ]
    finally:
        chat.close()


def test_bad_messages_are_refused(llm):
    with pytest.raises(ValueError, match="chat message 0"):
        llm.conversation([{"role": "system"}])
    chat = llm.conversation()
    with pytest.raises(ValueError, match="a message is a non-empty string"):
        chat.ask("", 2)
    assert chat.messages == []


def test_the_chat_command_answers_each_line_with_the_document_before_the_first(llm, tmp_path, monkeypatch, capsys):
    from engine.api import HybridLLM as Engine

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: llm))
    document = tmp_path / "doc.txt"
    document.write_text("Alice keeps the red key and Bob the blue one. " * 30)
    monkeypatch.setattr("sys.stdin", io.StringIO("Who keeps the red key?\n\nAnd the blue one?\n"))
    assert main(["chat", "--file", str(document), "--max-new-tokens", str(NEW), "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    turns = [{"role": "system", "content": "Be brief."}]
    turns.append({"role": "user", "content": document.read_text() + "\n\nWho keeps the red key?"})
    first = llm.generate(turns, NEW, progress=False).text
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the blue one?"}]
    second = llm.generate(turns, NEW, progress=False).text
    assert out == f"{first}\n{second}\n"  # the empty line asked nothing
    summaries = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert len(summaries) == 2 and " 0 of them kept" in summaries[0] and " 0 of them kept" not in summaries[1]


def test_the_chat_command_refuses_bad_options_in_one_line(capsys):
    assert main(["chat", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hybridattn: error: --temperature") and "\n" not in err


def test_messages_the_chat_template_refuses_are_a_clear_error(llm):
    import copy

    tokenizer = copy.deepcopy(llm.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    strict = HybridLLM(llm.model, tokenizer, llm.offload)
    with pytest.raises(ValueError, match="the model's chat template refused the messages: no tool turns"):
        strict.encode([{"role": "tool", "content": "x"}])


def test_ctrl_c_in_the_chat_command_stops_the_answer_not_the_chat(llm, monkeypatch, capsys):
    from engine.api import HybridLLM as Engine
    from engine.conversation import Conversation

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: llm))
    stream = Conversation.stream

    def interrupted_once(self, *args, **kwargs):
        pieces = stream(self, *args, **kwargs)
        yield next(pieces)
        if not self.messages:  # the first turn (no message kept before it is answered): Ctrl-C after its first piece
            pieces.close()
            raise KeyboardInterrupt
        yield from pieces

    monkeypatch.setattr(Conversation, "stream", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a story about the sea.\nAnd another.\n"))
    assert main(["chat", "--max-new-tokens", str(NEW)]) == 0
    out, err = capsys.readouterr()
    assert "[stopped: the conversation keeps what was shown]" in err
    assert len([line for line in err.splitlines() if line.startswith("[prompt")]) == 1  # the second turn answered
    assert out.count("\n") == 2  # each answer a line of its own, the one stopped too


def test_ctrl_c_in_the_first_turn_s_prefill_keeps_the_document_for_the_next_message(llm, monkeypatch, capsys, tmp_path):
    from engine.api import HybridLLM as Engine
    from engine.conversation import Conversation

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: llm))
    stream, asked = Conversation.stream, []

    def interrupted_in_its_prefill(self, content, *args, **kwargs):
        asked.append(content)
        if len(asked) == 1:  # before the turn has added its message, as in its prefill
            raise KeyboardInterrupt
        yield from stream(self, content, *args, **kwargs)

    monkeypatch.setattr(Conversation, "stream", interrupted_in_its_prefill)
    monkeypatch.setattr("sys.stdin", io.StringIO("Who keeps the red key?\nWho keeps it, again?\n"))
    (tmp_path / "doc.txt").write_text("Ann keeps the red key.")
    assert main(["chat", "--file", str(tmp_path / "doc.txt"), "--max-new-tokens", str(NEW)]) == 0
    assert "[stopped: the message, in its prefill, is not kept]" in capsys.readouterr().err
    assert [a.startswith("Ann keeps the red key.\n\n") for a in asked] == [True, True]  # it went without it


def test_a_turn_s_arguments_are_checked_before_its_prefill(llm):
    chat = llm.conversation()
    for kwargs in ({"max_new_tokens": -1}, {"temperature": -1.0}, {"stop": [""]}, {"top_p": 0}):
        with pytest.raises(ValueError):
            chat.ask("The grass is green. " * 20, **kwargs)
        with pytest.raises(ValueError):
            next(chat.stream("The grass is green. " * 20, **kwargs))
        assert chat.kept.prefix is None and chat.messages == []  # nothing prefilled for it (it was, then refused)


def test_a_saved_conversation_resumes_where_it_was_left(llm, tmp_path):
    chat = llm.conversation([{"role": "system", "content": "Answer briefly."}])
    path = tmp_path / "chat.safetensors"
    try:
        with pytest.raises(ValueError, match="no cache to save yet"):
            chat.save(path)
        chat.ask("The grass is green and the sky is blue. " * 20 + "What is green?", NEW, progress=False)
        chat.ask("And blue?", NEW, progress=False)
        assert chat.save(path, progress=False) > 0
        other = HybridLLM(llm.model, llm.tokenizer, llm.offload)  # another engine over the model, as a later process
        resumed = other.load_conversation(path, progress=False)
        try:
            assert resumed.messages == chat.messages and resumed.kept_tokens == chat.kept_tokens > 0
            kept = resumed.kept_tokens
            got = resumed.ask("Thanks. Which colours again?", NEW, progress=False)
            want = chat.ask("Thanks. Which colours again?", NEW, progress=False)
            assert got.text == want.text and resumed.found_kept == chat.found_kept == kept  # nothing prefilled again
        finally:
            resumed.close()
    finally:
        chat.close()


def test_a_file_that_holds_no_conversation_is_refused(llm, tmp_path):
    prefix = llm.prefix("The grass is green and the sky is blue. " * 5, progress=False)
    try:
        prefix.save(tmp_path / "prefix.safetensors", progress=False)
    finally:
        prefix.release()
    with pytest.raises(ValueError, match="holds a prefix, not a conversation"):
        llm.load_conversation(tmp_path / "prefix.safetensors")
    (tmp_path / "junk").write_bytes(b"not a file of this engine")
    with pytest.raises(ValueError, match="not a readable prefix file"):
        llm.load_conversation(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="no prefix file"):
        llm.load_conversation(tmp_path / "missing")


def test_the_chat_command_resumes_its_session_file(llm, tmp_path, monkeypatch, capsys):
    from engine.api import HybridLLM as Engine

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: llm))
    session = tmp_path / "chat.safetensors"
    opening = "The grass is green and the sky is blue. " * 20 + "What is green?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{opening}\n"))
    assert main(["chat", "--max-new-tokens", str(NEW), "--system", "Be brief.", "--session", str(session)]) == 0
    first, err = capsys.readouterr()
    assert f"[conversation saved to {session}: 3 messages" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("And blue?\n"))
    assert main(["chat", "--max-new-tokens", str(NEW), "--session", str(session)]) == 0
    second, err = capsys.readouterr()
    assert f"[resumed 3 messages from {session}" in err and f"[conversation saved to {session}: 5 messages" in err
    assert "loading prefix" not in err and "saving prefix" not in err  # no bars where stderr is no terminal
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": opening}]
    turns += [{"role": "assistant", "content": first.rstrip("\n")}, {"role": "user", "content": "And blue?"}]
    assert second == llm.generate(turns, NEW, progress=False).text + "\n"
    summary = next(line for line in err.splitlines() if line.startswith("[prompt"))
    assert " 0 of them kept" not in summary  # the first run's turn found kept, loaded from the file
    (tmp_path / "doc.txt").write_text("A document.")
    for flag in (["--system", "Be brief."], ["--file", str(tmp_path / "doc.txt")]):  # a new conversation's: refused
        assert main(["chat", "--session", str(session), *flag]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds a conversation already" in err and "\n" not in err
