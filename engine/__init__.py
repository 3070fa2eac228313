"""hybridattn engine: long-context decoding with a host-memory KV cache and retrieval attention."""
