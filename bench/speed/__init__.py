"""Speed benchmarks: the host kernel, decode against context length, batches, prefill (`python -m bench.speed.NAME`)."""
