"""Answers kept as they come, so that an interrupted evaluation resumes where it stopped.

An `AnswerLog` is a JSON-lines file: a first line naming the run (model, methods, ...), then a
line per answer, {"method", "request" (a hash of lm-eval's request arguments: the document's
whole prompt and its generation arguments), "answer", "report"}. Opening a log that names
another run is refused: the same prompt asked of another model must not find its answers. A
line cut short by a killed run is skipped. JSON only: nothing in the file is executed or
unpickled. `LoggedLM` wraps any lm-eval model (lm-eval's `hf` one here) so that its answers go
to a log and come back from it; bench.evals.shared_lm writes every method's answer and report
itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def request_key(args) -> str:
    """The hash of one request's arguments (prompt and generation arguments)."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()


class AnswerLog:
    """The answers of the run `run` (a JSON-able dict) in `path`, those already there read back."""

    def __init__(self, path: str | Path, run: dict):
        self.path, self.run = Path(path), json.loads(json.dumps(run))  # as read back: tuples are lists
        self.entries: dict[tuple[str, str], dict] = {}
        if self.path.exists() and self.path.stat().st_size:
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"run": self.run}) + "\n")

    def _read(self) -> None:
        lines = self.path.read_text().splitlines()
        try:
            head = json.loads(lines[0])["run"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path} is not an answer log (its first line names no run)") from None
        if head != self.run:
            differ = sorted(k for k in head.keys() | self.run.keys() if head.get(k) != self.run.get(k))
            raise ValueError(f"{self.path} holds the answers of another run (it differs in {', '.join(differ)})")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                self.entries[entry["method"], entry["request"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # the last line of a run killed while writing it

    def get(self, method: str, args) -> dict | None:
        """`method`'s entry for the request with arguments `args`: {"answer", "report"}, or None."""
        return self.entries.get((method, request_key(args)))

    def add(self, method: str, args, answer: str, report: dict | None = None) -> None:
        entry = {"method": method, "request": request_key(args), "answer": answer, "report": report}
        self.entries[method, entry["request"]] = entry
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


class LoggedLM:
    """The lm-eval model `lm` answering as `method`: `generate_until` requests found in `log` are
    answered from it, the others by `lm`, each written to the log as `lm` answers it (through
    lm-eval's cache hook, which its models call once per request)."""

    def __init__(self, lm, log: AnswerLog, method: str):
        self.lm, self.log, self.method = lm, log, method
        lm.set_cache_hook(self)

    def add_partial(self, attr: str, args, result) -> None:  # lm-eval's cache hook
        if attr == "generate_until":
            self.log.add(self.method, args, result)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        found = [self.log.get(self.method, r.args) for r in requests]
        todo = [r for r, entry in zip(requests, found) if entry is None]
        fresh = iter(self.lm.generate_until(todo, disable_tqdm=disable_tqdm) if todo else [])
        return [entry["answer"] if entry else next(fresh) for entry in found]

    def __getattr__(self, name: str):
        return getattr(self.lm, name)
