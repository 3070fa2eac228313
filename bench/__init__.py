"""Benchmarks and evaluations, one module per measured claim, each writing JSON:
`bench.speed` (how fast), `bench.evals` (how faithful and how accurate), `bench.common`
(their shared pieces), `bench.report` (JSON to Markdown), `bench.gpu_check` (the check on
a CUDA GPU)."""
