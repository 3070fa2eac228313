"""engine.decode.merge.attend: exact attention with log-sum-exp, on both of its paths."""

import pytest
import torch

from engine.cache.store import copy_rows, rows_on
from engine.decode import merge
from tests.reference import full_attention_ref


@pytest.fixture(params=["cpu_flash", "matmul"])
def path(request, monkeypatch):
    if request.param == "matmul":  # the path of devices and dtypes without a flash kernel
        monkeypatch.setattr(merge, "_flash", lambda q: None)
    return request.param


def case(Hkv, G, Q, T, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv, G, Q, D, generator=g).to(dtype)
    return q, torch.randn(Hkv, T, D, generator=g).to(dtype), torch.randn(Hkv, T, D, generator=g).to(dtype)


def reference(q, k, v, scale, causal):
    Hkv, G, Q, D = q.shape
    kx = k.unsqueeze(1).expand(Hkv, G, -1, D).reshape(Hkv * G, -1, D)
    vx = v.unsqueeze(1).expand(Hkv, G, -1, D).reshape(Hkv * G, -1, D)
    o, lse = full_attention_ref(q.reshape(Hkv * G, Q, D), kx, vx, scale, causal=causal)
    return o.view(Hkv, G, Q, D), lse.view(Hkv, G, Q)


@pytest.mark.parametrize("Q,T,block", [(1, 61, 16), (27, 97, 32), (5, 300, 300)])
def test_full_attention_over_blocks(path, Q, T, block):
    q, k, v = case(3, 3, Q, T, 16)
    o, lse = merge.attend(q, k, v, 0.3, block=block)
    ro, rl = reference(q, k, v, 0.3, causal=False)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Q,block", [(1, 16), (61, 16), (97, 128)])
def test_causal_self_attention(path, Q, block):
    q, k, v = case(2, 4, Q, Q, 32, seed=Q)
    o, lse = merge.attend(q, k, v, 0.2, causal=True, block=block)
    ro, rl = reference(q, k, v, 0.2, causal=True)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_keys(path, dtype):
    q, k, v = case(2, 2, 3, 0, 8, dtype=dtype)
    o, lse = merge.attend(q, k, v, 1.0)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    assert o.dtype == lse.dtype == torch.float32  # the flash path's lse came in q's dtype


def test_bf16_keys_with_fp32_queries(path):
    q, k, v = case(1, 2, 4, 50, 16)
    o, _ = merge.attend(q, k.bfloat16(), v.bfloat16(), 0.25)
    ro, _ = reference(q, k.bfloat16().float(), v.bfloat16().float(), 0.25, causal=False)
    torch.testing.assert_close(o.double(), ro, atol=1e-2, rtol=1e-2)


def test_causal_needs_a_square(path):
    q, k, v = case(1, 1, 4, 5, 8)
    with pytest.raises(ValueError, match="as many keys as queries"):
        merge.attend(q, k, v, 1.0, causal=True)


def test_flash_kernel_choice_on_the_cpu():
    q = torch.zeros(1, 1, 2, 8)
    assert merge._flash(q) is merge._cpu_flash
    assert merge._flash(q.to("meta")) is None  # no kernel there: the plain matmul path


def test_copy_rows_fills_a_strided_slice_of_a_store():
    store = torch.zeros(3, 10, 4)  # [H, capacity, D]: a slice of it has its heads strided by the capacity
    rows = torch.randn(5, 3, 4).transpose(0, 1)  # [3, 5, 4], not contiguous either
    copy_rows(store[:, 2:7], rows)
    assert torch.equal(store[:, 2:7], rows) and not store[:, :2].any() and not store[:, 7:].any()
    assert rows_on(rows, rows.device) is rows
