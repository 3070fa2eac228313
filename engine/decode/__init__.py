"""The decode step of one layer, stage by stage (engine.decode.step runs them):

```
q (device) ──► resident attention over sinks + recent window (device) ─► (o_r, lse_r)
  │
  ├─► block index (device): score blocks by q vs landmarks ─► candidate blocks   select.py
  │
  └─► q to host ─► key index (host, per KV head): candidate token ids            select.py
                          │
        ids = (candidate-block tokens ∪ key-index candidates ∪ newest keys), deduplicated
        adaptive budget: keep those whose estimated probability is high enough    rate.py, sketch.py
                          │
       C++ gather-attend (host): gather K/V rows by id, online softmax ─► (o_c, lse_c)   engine.native
                          │
       blocks with unread tokens estimated from mean key and value ─► (o_e, lse_e)      estimate.py
                          │
       merge by log-sum-exp: (o_r, lse_r) ⊕ (o_c, lse_c) ⊕ (o_e, lse_e)                merge.py
                          │
       near tie in the logits: the approximate positions run again exactly         recheck.py
```

Where it serves the configuration (host.py says which), the host's part of the diagram, from
the candidate ids to (o_c, lse_c) and the reads per block, is one native call for every
sequence and KV head of a batch (host.py, C++ `host_step`); select.py and rate.py are then
its reference, and the path of the configurations it does not serve.
"""
