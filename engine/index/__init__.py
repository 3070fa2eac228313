"""The host key index: built per layer from the host keys and the sampled prefill
queries (`build`), on a worker thread while the prefill goes on (`worker`); one `ann`
index per KV head or the query->query lists of all heads (`heads`); distinct ids per
head (`distinct`)."""
