"""Pieces the benchmark and evaluation scripts share, one job a module:

- `options`: the command-line options they repeat (--quick, --json, --plot, --threads,
  --model, --chunk) and the thread pools pinned and printed;
- `output`: the JSON they write, with the run's machine, threads, date and commit; their plots;
- `timing`: warm-up then the median of several runs, runs taken in turns, per-layer clocks;
- `models`: random-weight Llama models of given shapes (the test suite builds its own here too);
- `caches`: caches holding a long context drawn with a real prefill's per-channel statistics;
- `text`: prompts of natural text, from the licence texts every Debian system carries.
"""
