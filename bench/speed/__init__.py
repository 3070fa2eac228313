"""Speed benchmarks: the host kernel, the host side of a decode step, decode against context length, batches,
prefill (`python -m bench.speed.NAME`)."""
