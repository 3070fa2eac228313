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
"""
