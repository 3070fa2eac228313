"""Benchmarks and evaluations, one module per measured claim, each writing JSON:
`bench.speed` (how fast), `bench.evals` (how faithful and how accurate), `bench.common`
(their shared pieces), `bench.tables` (JSON to Markdown tables), `bench.report` (the docs'
tables kept up to date), `bench.gpu_check` (the check on a CUDA GPU)."""
