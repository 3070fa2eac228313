"""Evaluations against full attention: decode-attention fidelity, accuracy on generated
long-context tasks, long generation, re-check margins, key-index recall, a long-run soak
(`python -m bench.evals.NAME`)."""
