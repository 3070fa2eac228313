"""The lm-evaluation-harness model (engine.harness): its scores are lm-eval's `hf` model's on the
same weights, its generations the engine's (full attention's with a covering budget), batches give
what each request gives alone; model arguments and their errors; local tasks through
lm_eval.simple_evaluate and the command line, and a RULER task on the bundled model, offline."""

import copy
import json

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from engine import OffloadConfig
from engine.api import HybridLLM
from engine.cli import main
from engine.harness import HybridAttnLM, offload_config, task_manager, tokenizer_source
from engine.stop import StopStrings
from tests.conftest import tiny_llama
from tests.test_attention import COVER_ALL
from tests.test_stop import first_new_piece, stopped_at

# a small window and chunks of 7: the scored texts cross chunks and reach the host store
CFG = OffloadConfig(
    device="cpu", n_sink=4, window=16, block_size=8, prefill_chunk=7, key_index="flat", budget="fixed", top_k=8
)
TEXT = "The quick brown fox jumps over the lazy dog. " * 8


@pytest.fixture(scope="module")
def reference(bundled_tokenizer):
    """lm-eval's own `hf` model: full attention (sdpa) on the same weights."""
    model = tiny_llama(vocab=len(bundled_tokenizer))
    model.set_attn_implementation("sdpa")
    return HFLM(pretrained=model, tokenizer=bundled_tokenizer, batch_size=1, max_length=64)


def engine_lm(tokenizer, cfg=CFG, **kwargs) -> HybridAttnLM:
    llm = HybridLLM(tiny_llama(vocab=len(tokenizer)), tokenizer, cfg)
    return HybridAttnLM(llm=llm, max_length=64, **kwargs)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_scores_are_lm_eval_hf_model_s(bundled_tokenizer, reference):
    """Scoring is a prefill, and the engine's is exact: contexts cut to max_length, an empty
    context (scored after BOS), texts over several rolling windows."""
    lm = engine_lm(bundled_tokenizer)
    pairs = [(TEXT, " The end of it all."), ("", "Hello there"), ("The quick brown", " fox")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    want = reference.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4) and g_greedy == w_greedy
    texts = [(TEXT * 3,), ("A short one.",)]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True)
    want = reference.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3) and got[0] < got[1] < 0


def test_scoring_a_prompt_that_ends_one_past_a_chunk_is_exact(bundled_tokenizer, reference):
    """A last chunk of one position would be a decode step (an approximate read): the prefill
    joins it to the chunk before (engine.prefill.chunk_bounds)."""
    lm = engine_lm(bundled_tokenizer)
    ids = lm.tok_encode(TEXT)[:50]  # 49 positions scored through: 7 chunks of 7, and one more position
    assert len(ids) == 50
    got, _ = lm.score(ids[:40], ids[40:])
    ((want, _),) = reference._loglikelihood_tokens([(None, ids[:40], ids[40:])], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-4)


def test_generations_are_the_engine_s_and_batches_give_each_alone(bundled_tokenizer):
    lm = engine_lm(bundled_tokenizer)
    gen = [
        (TEXT + "And then", {"until": ["."], "max_gen_toks": 6}),  # longer than max_length: cut to its end
        ("One, two, three,", {"until": [], "max_gen_toks": 4}),
        (TEXT[:150], {"until": ["."], "max_gen_toks": 6}),
    ]
    # the third's `until`: a piece of its answer from the third token on (a random model's answer holds no ".")
    free = lm.llm.generate(torch.tensor(lm.tok_encode(gen[2][0])), 6, progress=False).token_ids
    gen[2][1]["until"] = [first_new_piece(StopStrings(bundled_tokenizer, []), free, 2)]
    named = [Instance("generate_until", {}, a, i, metadata=("t", i, 1)) for i, a in enumerate(gen)]  # reports by doc
    alone = lm.generate_until(named, disable_tqdm=True)
    for i, ((context, kwargs), text) in enumerate(zip(gen, alone)):
        ids = lm.tok_encode(context)[-(lm.max_length - kwargs["max_gen_toks"]) :]
        free = lm.llm.generate(torch.tensor(ids), kwargs["max_gen_toks"], progress=False)
        assert text == (free.text.split(kwargs["until"][0])[0] if kwargs["until"] else free.text)
        # decoded up to the token that completed the `until` string, not on to max_gen_toks
        n = stopped_at(StopStrings(bundled_tokenizer, kwargs["until"]), free.token_ids)
        assert lm.reports["t", i].new_tokens == n
    assert lm.reports["t", 2].new_tokens < 6  # it ended at its `until`
    assert len(lm.tok_encode(gen[0][0])) > lm.max_length
    batched = engine_lm(bundled_tokenizer, batch_size=2).generate_until(requests("generate_until", gen), True)
    assert batched == alone


def test_with_a_covering_budget_generations_are_lm_eval_hf_model_s(bundled_tokenizer, reference):
    lm = engine_lm(bundled_tokenizer, cfg=OffloadConfig(device="cpu", **COVER_ALL, prefill_chunk=16))
    gen = [(TEXT + "And then", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False})]
    assert lm.generate_until(requests("generate_until", gen), True) == reference.generate_until(
        requests("generate_until", gen), True
    )


def test_a_tokenizer_that_adds_bos_scores_and_generates_as_lm_eval_hf_model(bundled_tokenizer):
    """Llama's tokenizer begins every text with BOS: the contexts scored and the prompts answered do too
    (lm-eval's `hf` model keeps the tokenizer's default), and a context that begins with BOS gets no second."""
    tokenizer = copy.deepcopy(bundled_tokenizer)
    tokenizer.add_bos_token = True
    model = tiny_llama(vocab=len(tokenizer))
    lm = HybridAttnLM(llm=HybridLLM(model, tokenizer, OffloadConfig(device="cpu", **COVER_ALL)), max_length=64)
    reference_model = copy.deepcopy(model)
    reference_model.set_attn_implementation("sdpa")
    reference = HFLM(pretrained=reference_model, tokenizer=tokenizer, batch_size=1, max_length=64)
    bos = tokenizer.bos_token_id
    assert lm.tok_encode("Hello world")[0] == bos and lm.tok_encode(tokenizer.bos_token + "Hello").count(bos) == 1
    pairs = [("The quick brown fox", " jumps over")]
    got, want = (m.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True) for m in (lm, reference))
    assert got[0][0] == pytest.approx(want[0][0], abs=1e-4)
    texts = [("The quick brown fox jumps",)]
    got, want = (
        m.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True) for m in (lm, reference)
    )
    assert got == pytest.approx(want, abs=1e-4)
    gen = [("The quick brown fox jumps over the lazy dog. And", {"until": [], "do_sample": False, "max_gen_toks": 6})]
    assert lm.generate_until(requests("generate_until", gen), True) == reference.generate_until(
        requests("generate_until", gen), True
    )


def test_generation_arguments_are_read_as_lm_eval_reads_them(bundled_tokenizer):
    """`max_new_tokens` for `max_gen_toks`; a temperature above 0 samples without `do_sample`; a request
    repeated (a task's `repeats`) draws a sample each time, each with its report, the same again for the
    same torch seed."""
    lm = engine_lm(bundled_tokenizer)
    assert lm._generation_args({"max_new_tokens": 3})[1] == 3
    assert lm._generation_args({"temperature": 0.7})[2]["temperature"] == 0.7
    assert lm._generation_args({"temperature": 0.7, "do_sample": False})[2]["temperature"] == 0.0
    assert lm._generation_args({"do_sample": True, "top_p": None})[2]["top_p"] == 1.0
    assert lm._generation_args({"do_sample": True, "top_p": 0})[2]["top_p"] == 0.0  # refused when sampled, not all
    kwargs = {"until": [], "temperature": 1.0, "max_new_tokens": 8}
    repeated = [Instance("generate_until", {}, ("One, two, three,", kwargs), 0, metadata=("t", 0, 4))] * 4
    torch.manual_seed(0)
    samples = lm.generate_until(repeated, disable_tqdm=True)
    assert len(set(samples)) == 4 and all(lm.tok_encode(s) for s in samples)
    assert sorted(lm.reports) == [("t", 0), ("t", 0, 1), ("t", 0, 2), ("t", 0, 3)]
    assert all(r.new_tokens == 8 for r in lm.reports.values())
    torch.manual_seed(0)
    assert lm.generate_until(repeated, disable_tqdm=True) == samples
    unnamed = engine_lm(bundled_tokenizer)
    unnamed.generate_until(requests("generate_until", [("One,", kwargs), ("Two,", kwargs)]), disable_tqdm=True)
    assert sorted(unnamed.reports) == [(None, 0), (None, 1)]  # no document ids: by index


def test_a_max_length_without_room_is_refused_by_name(bundled_tokenizer):
    for bad in (-5, 1, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be an int >= 2"):
            HybridAttnLM(llm=object(), max_length=bad)
    lm = engine_lm(bundled_tokenizer)
    gen = [("One, two, three,", {"until": [], "max_gen_toks": 64})]
    with pytest.raises(ValueError, match=r"max_gen_toks \(64\) leaves no room for the prompt within max_length \(64\)"):
        lm.generate_until(requests("generate_until", gen), disable_tqdm=True)


def test_model_arguments_reach_the_configuration_and_bad_ones_are_named():
    cfg = offload_config("tight", {"window": 64, "min_prob": 1, "index_params": '{"m_keys": 32}', "device": "cpu"})
    assert (cfg.window, cfg.min_prob, cfg.index_params) == (64, 1.0, {"m_keys": 32})
    assert cfg.min_prob == OffloadConfig.preset("tight", window=64, min_prob=1.0, index_params={"m_keys": 32}).min_prob
    with pytest.raises(ValueError, match="unknown model argument.*windw"):
        offload_config("default", {"windw": 64})
    with pytest.raises(ValueError, match="window"):
        offload_config("default", {"window": -1})
    with pytest.raises(ValueError, match="batch_size"):
        HybridAttnLM(batch_size="auto", llm=object())
    with pytest.raises(ValueError, match="batch_size"):
        HybridAttnLM(batch_size="two", llm=object())
    with pytest.raises(ValueError, match="dtype"):
        HybridAttnLM(dtype="int8", llm=object())
    with pytest.raises(ValueError, match="not both"):
        HybridAttnLM(llm=object(), window=64)
    for unclear in ("no", "yes", "off", 2):  # only what means True or False: "no" must not turn it on
        with pytest.raises(ValueError, match="trust_remote_code must be True or False"):
            HybridAttnLM(llm=object(), trust_remote_code=unclear)


def test_trust_remote_code_reaches_the_loader_as_lm_eval_parses_it(monkeypatch):
    asked = []

    def loader(pretrained, **kwargs):
        asked.append(kwargs["trust_remote_code"])
        raise RuntimeError("loaded")  # nothing further to build

    monkeypatch.setattr(HybridLLM, "from_pretrained", staticmethod(loader))
    for given in (True, False, 1, 0):  # lm-eval turns "true" and "false" into bools, "1" and "0" into ints
        with pytest.raises(RuntimeError, match="loaded"):
            HybridAttnLM(pretrained="smollm2-135m", trust_remote_code=given)
    assert asked == [True, False, True, False]
    with pytest.raises(RuntimeError, match="loaded"):
        HybridAttnLM(pretrained="smollm2-135m")
    assert asked[-1] is False  # off unless asked


LOCAL_TASKS = {
    "tiny_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    },
    "tiny_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
}
DOCS = [
    {
        "question": "The sky is blue. What colour is the sky? The sky is",
        "answer": " blue",
        "choices": [" blue", " red"],
    },
    {"question": "One, two, three, four,", "answer": " five", "choices": [" six", " five"]},
    {"question": "Cats say", "answer": " meow", "choices": [" meow", " woof"]},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two tasks read from local files (JSON lines; no hub)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(dict(d, label=1 - int(d["choices"][0] == d["answer"]))) + "\n" for d in DOCS))
    for name, spec in LOCAL_TASKS.items():
        spec = dict(spec, task=name, dataset_path="json", test_split="test")
        spec["dataset_kwargs"] = {"data_files": {"test": str(data)}}
        (folder / f"{name}.yaml").write_text(json.dumps(spec))  # YAML reads JSON
    return folder


def test_simple_evaluate_runs_local_tasks_as_lm_eval_s_hf_model_does(bundled_tokenizer, reference, task_dir):
    lm = engine_lm(bundled_tokenizer, cfg=OffloadConfig(device="cpu", **COVER_ALL, prefill_chunk=16))
    tasks = task_manager(list(LOCAL_TASKS), task_dir)
    runs = [lm_eval.simple_evaluate(model=m, tasks=list(LOCAL_TASKS), task_manager=tasks) for m in (lm, reference)]
    got, want = (r["results"] for r in runs)
    assert got["tiny_choice"]["acc,none"] == want["tiny_choice"]["acc,none"]
    assert got["tiny_gen"]["exact_match,none"] == want["tiny_gen"]["exact_match,none"]
    assert runs[0]["n-samples"]["tiny_gen"]["effective"] == len(DOCS)


def test_local_tasks_are_found_without_indexing_lm_eval_s_own(task_dir, monkeypatch):
    """task_manager indexes lm-eval's own tasks (thousands of YAML files) only where a task asked
    for is not one of include_path's, or there is no include_path."""
    real, made = lm_eval.tasks.TaskManager, []

    def recording(include_path=None, include_defaults=True, metadata=None):
        made.append(include_defaults)
        if include_defaults:
            return "every task"  # not built: it would read every YAML file of lm-eval's
        return real(include_path=include_path, include_defaults=False, metadata=metadata)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", recording)
    local = task_manager(list(LOCAL_TASKS), task_dir, {"tokenizer": "t"})
    assert made == [False] and set(local.all_tasks) == set(LOCAL_TASKS) and local.metadata == {"tokenizer": "t"}
    made.clear()
    assert task_manager(["tiny_gen", "arc_easy"], task_dir) == "every task" and made == [False, True]
    made.clear()
    assert task_manager(["tiny_gen"]) == "every task" and made == [True]


def test_command_line_route_and_its_errors(task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", "--lm-eval", "tiny_gen", "tiny_choice", "--include-path", str(task_dir), "--window", "64"]
    assert main([*argv, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["results"]) == set(LOCAL_TASKS) and results["config"]["offload"]["window"] == 64
    assert "tiny_choice" in capsys.readouterr().out  # lm-eval's table
    assert main(["eval", "--lm-eval", "no_such_task", "--include-path", str(task_dir)]) == 2
    assert "unknown lm-eval task(s): no_such_task" in capsys.readouterr().err
    assert main(["eval", "--lm-eval", "tiny_gen", "--include-path", str(tmp_path / "none")]) == 2


def test_a_ruler_task_runs_offline_on_the_bundled_model_from_python():
    """lm-eval's RULER builds its data with the model's tokenizer, found here without a hub."""
    results = lm_eval.simple_evaluate(
        model="hybridattn",
        model_args="pretrained=smollm2-135m,window=64,device=cpu",
        tasks=["niah_single_1"],
        limit=1,
        metadata={"max_seq_lengths": [512], "tokenizer": tokenizer_source("smollm2-135m")},
    )
    score = results["results"]["niah_single_1"]["512,none"]
    assert 0.0 <= score <= 1.0 and results["n-samples"]["niah_single_1"]["effective"] == 1


def test_ruler_bench_cells_and_a_run_on_a_local_task(task_dir, tmp_path):
    """bench.evals.ruler: per task and metric the mean with its interval (Wilson's for right/wrong
    scores, lengths not run left out) and the engine's read share; then a short run, full attention
    beside the default, on the same documents."""
    from types import SimpleNamespace

    from bench.evals import ruler

    samples = {
        "t": [
            {"doc_id": 0, "metrics": ["4096", "8192"], "4096": 1.0, "8192": -1},
            {"doc_id": 1, "metrics": ["4096", "8192"], "4096": 0.0, "8192": -1},
            {"doc_id": 2, "metrics": ["4096", "8192"], "4096": -1, "8192": 0.5},
        ]
    }
    reports = {("t", 0): SimpleNamespace(kv_read_frac=0.1, decode_steps=10, rechecked_steps=1)}
    reports[("t", 1)] = SimpleNamespace(kv_read_frac=0.3, decode_steps=10, rechecked_steps=0)
    rows = {r["metric"]: r for r in ruler.cells(samples, reports)}
    assert rows["4096"]["n"] == 2 and rows["4096"]["score"] == 0.5 and 0 < rows["4096"]["low"] < 0.5
    assert rows["4096"]["scores"] == [1.0, 0.0] and rows["8192"]["scores"] == [0.5]
    assert rows["4096"]["read_frac"] == pytest.approx(0.2) and rows["4096"]["rechecked_frac"] == pytest.approx(0.05)
    assert rows["8192"]["n"] == 1 and "read_frac" not in rows["8192"]
    out = tmp_path / "ruler.json"
    argv = ["--tasks", "tiny_gen", "--include-path", str(task_dir), "--limit", "2", "--configs", "default"]
    ruler.main([*argv, "--peers", "streaming", "--threads", "1", "--json", str(out)])
    got = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(got) == {"full", "default", "streaming@default"} and got["full"]["n"] == got["default"]["n"] == 2
    assert got["streaming@default"]["n"] == 2 and got["streaming@default"]["read_frac"] == 0.0
    with pytest.raises(SystemExit):  # the peers' shares come from a configuration that runs
        ruler.main([*argv, "--peers", "quest", "--peers-at", "fixed"])
    # the engine's reports joined to its documents (short prompts: all resident, nothing read on the host)
    assert got["default"]["read_frac"] == 0.0 and got["default"]["rechecked_frac"] == 0.0
    assert "read_frac" not in got["full"]


def test_ruler_documents_are_built_from_the_seed(monkeypatch):
    """RULER's generators draw from the global random and numpy states: bench.evals.ruler seeds
    both before the build, so a seed builds the same documents in every run, another seed others."""
    import random

    import numpy as np

    import engine.harness
    from bench.evals import ruler

    class Manager:  # lm-eval's index is not needed here: what its load draws stands for the documents
        def load(self, tasks):
            return random.random(), np.random.rand()

    monkeypatch.setattr(engine.harness, "task_manager", lambda *args: Manager())
    built = [ruler.build_tasks(["t"], [512], "tok", seed) for seed in (0, 0, 1)]
    assert built[0] == built[1] and built[0][0] != built[2][0] and built[0][1] != built[2][1]


def test_answer_log_reads_back_what_a_run_wrote_and_refuses_another_run(tmp_path):
    from bench.evals.answer_log import AnswerLog

    path, run = tmp_path / "log.jsonl", {"model": "m", "configs": ["default"]}
    log = AnswerLog(path, run)
    log.add("full", ("prompt", {"until": ["\n"]}), " 7")
    log.add("default", ("prompt", {"until": ["\n"]}), " 8", {"kv_read_frac": 0.25})
    with path.open("a") as f:
        f.write('{"method": "default", "request": "ab')  # a run killed while writing
    again = AnswerLog(path, run)
    assert again.get("full", ("prompt", {"until": ["\n"]}))["answer"] == " 7"
    assert again.get("default", ("prompt", {"until": ["\n"]}))["report"] == {"kv_read_frac": 0.25}
    assert again.get("full", ("prompt", {"until": ["\n\n"]})) is None and len(again.entries) == 2
    with pytest.raises(ValueError, match="another run .*differs in configs"):
        AnswerLog(path, run | {"configs": ["fixed"]})
    (tmp_path / "other.txt").write_text("not json\n")
    with pytest.raises(ValueError, match="not an answer log"):
        AnswerLog(tmp_path / "other.txt", run)


def test_an_interrupted_ruler_run_resumes_from_its_answer_log(task_dir, tmp_path, monkeypatch):
    """bench.evals.ruler --resume: every method's answers (and the engine's reports) go to the log
    as they come; after a run cut short the same command asks the models only what is not there,
    and gives the rows the uninterrupted run gave; another run's log is refused by name."""
    from bench.evals import ruler, shared_lm

    log, out = tmp_path / "answers.jsonl", tmp_path / "ruler.json"
    argv = ["--tasks", "tiny_gen", "--include-path", str(task_dir), "--limit", "3", "--configs", "default"]
    argv += ["--peers", "streaming", "--threads", "1", "--json", str(out), "--resume", str(log)]
    ruler.main(argv)
    first = json.loads(out.read_text())["rows"]
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 3 * 3  # the run, then 3 documents x (full, default, streaming@default)
    kept = [line for line in lines[1:] if json.loads(line)["request"] == json.loads(lines[1])["request"]]
    log.write_text("\n".join([lines[0], *kept]) + "\n")  # as if stopped after the first document

    asked = {"full": 0, "engine": 0}
    generate, answer_all = HFLM.generate_until, shared_lm.SharedPrefillLM._answer_all
    monkeypatch.setattr(HFLM, "generate_until", lambda s, r, **k: asked.update(full=len(r)) or generate(s, r, **k))
    monkeypatch.setattr(
        shared_lm.SharedPrefillLM, "_answer_all", lambda *a: asked.update(engine=asked["engine"] + 1) or answer_all(*a)
    )
    ruler.main(argv)
    assert asked == {"full": 2, "engine": 2}
    assert json.loads(out.read_text())["rows"] == first
    ruler.main(argv)  # everything is in the log now
    assert asked == {"full": 2, "engine": 2} and json.loads(out.read_text())["rows"] == first
    with pytest.raises(SystemExit):
        ruler.main([*argv[:-2], "--resume", str(log), "--seed", "1"])


def test_methods_answer_lm_eval_requests_from_one_prefill(bundled_tokenizer, monkeypatch):
    """bench.evals.shared_lm: one prefill per request serves every method; a configuration answers
    and reads as the engine's own lm-eval model does; each peer reads the share its configuration
    read (all of it: lm-eval's `hf` model's generation); unknown names, a peer's share from a
    configuration that does not run and a sampling request are refused by name."""
    from bench.evals import shared_lm
    from bench.evals.probes import CONFIGS, prefilled
    from bench.evals.shared_lm import SharedPrefillLM

    model = tiny_llama(vocab=len(bundled_tokenizer))
    context = TEXT * 10 + "And then"  # longer than the sinks and window: a host store to read
    args = (context, {"until": ["\n\n"], "max_gen_toks": 6})
    request = [Instance("generate_until", {}, args, 0, metadata=("t", 3, 1))]
    model.set_attn_implementation("sdpa")
    full = HFLM(pretrained=model, tokenizer=bundled_tokenizer, batch_size=1, max_length=2048).generate_until(
        request, True
    )
    prefills = []
    monkeypatch.setattr(shared_lm, "prefilled", lambda *a: prefills.append(1) or prefilled(*a))
    lm = SharedPrefillLM(model, bundled_tokenizer, ["exact"], ["streaming", "snapkv", "quest"], max_length=2048)
    for method in lm.methods:  # "exact" reads every host token, and so do the peers given its share
        lm.answer_as(method)
        assert lm.generate_until(request, True) == full, method
        assert lm.reports["t", 3].kv_read_frac == pytest.approx(1.0) and lm.reports["t", 3].decode_steps == 5
    assert len(prefills) == 1

    model.set_attn_implementation("hybrid")
    engine = HybridAttnLM(llm=HybridLLM(model, bundled_tokenizer, CONFIGS["default"]), max_length=2048)
    alone = engine.generate_until(request, True)
    lm = SharedPrefillLM(model, bundled_tokenizer, ["default", "fixed"], ["streaming"], "fixed", max_length=2048)
    assert lm.generate_until(request, True) == alone
    assert lm.reports["t", 3].kv_read_frac == pytest.approx(engine.reports["t", 3].kv_read_frac)
    lm.answer_as("streaming@fixed")
    lm.generate_until(request, True)
    fixed = lm.reports_of["fixed"]["t", 3].kv_read_frac
    assert 0 < fixed < 0.5 and lm.reports["t", 3].kv_read_frac == pytest.approx(fixed, rel=0.1)
    assert len(prefills) == 2
    # the default's prefill whichever comes first: after "exact" (no key index) the default's copy built its own
    # from one decode query, after "fixed" (a shorter window) it could not copy at all
    for first in ("exact", "fixed"):
        lm = SharedPrefillLM(model, bundled_tokenizer, [first, "default"], max_length=2048)
        lm.answer_as("default")
        assert lm.generate_until(request, True) == alone
        assert lm.reports["t", 3].kv_read_frac == pytest.approx(engine.reports["t", 3].kv_read_frac)
    with pytest.raises(ValueError, match="unknown method 'quest@fixed'"):
        lm.answer_as("quest@fixed")
    with pytest.raises(ValueError, match="h2o"):
        SharedPrefillLM(model, bundled_tokenizer, ["default"], ["h2o"])
    with pytest.raises(ValueError, match="'fixed', which is not among"):
        SharedPrefillLM(model, bundled_tokenizer, ["default"], ["quest"], peers_at="fixed")
    sampled = [Instance("generate_until", {}, (context, {"do_sample": True, "temperature": 0.7}), 0, ("t", 3, 1))]
    with pytest.raises(ValueError, match="sampling"):
        SharedPrefillLM(model, bundled_tokenizer, ["default"]).generate_until(sampled, True)
