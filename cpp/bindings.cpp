// Python bindings of the host kernels. Buffers arrive through the buffer
// protocol (numpy arrays, or torch CPU tensors viewed as numpy by engine.ops),
// are checked here for format, shape and layout, and are never copied: a
// wrong buffer raises instead of being silently converted.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "hybridattn/gather_attend.h"
#include "hybridattn/gather_scores.h"
#include "hybridattn/host_step.h"
#include "hybridattn/merge.h"
#include "hybridattn/query_dots.h"

namespace py = pybind11;
using hybridattn::StoreType;

namespace {

[[noreturn]] void fail(const std::string& what) { throw py::value_error(what); }

bool is_format(const py::buffer_info& b, char c) { return b.format.size() == 1 && b.format[0] == c; }

bool is_int64(const py::buffer_info& b) {
  return b.itemsize == 8 && (is_format(b, 'q') || is_format(b, 'l'));
}

void expect_ndim(const py::buffer_info& b, const char* name, py::ssize_t ndim) {
  if (b.ndim != ndim)
    fail(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got " + std::to_string(b.ndim));
}

// Rows (the last dimension) packed, and every dimension before laid out C-order.
void expect_contiguous(const py::buffer_info& b, const char* name) {
  py::ssize_t expected = b.itemsize;
  for (py::ssize_t i = b.ndim - 1; i >= 0; --i) {
    if (b.shape[i] > 1 && b.strides[i] != expected) fail(std::string(name) + " must be contiguous");
    expected *= b.shape[i];
  }
}

py::buffer_info request_float32(const py::buffer& buf, const char* name, py::ssize_t ndim, bool writable) {
  py::buffer_info b = buf.request(writable);
  if (!is_format(b, 'f')) fail(std::string(name) + " must be float32, got buffer format '" + b.format + "'");
  expect_ndim(b, name, ndim);
  expect_contiguous(b, name);
  return b;
}

// A K or V store [Hkv, N, D]: rows and tokens packed, heads at any non-negative stride.
hybridattn::StoreView store_view(const py::buffer& buf, const std::string& name, const std::string& dtype) {
  py::buffer_info b = buf.request();
  expect_ndim(b, name.c_str(), 3);
  StoreType type;
  if (dtype == "float32" && is_format(b, 'f')) {
    type = StoreType::f32;
  } else if (dtype == "float16" && is_format(b, 'e')) {
    type = StoreType::f16;
  } else if (dtype == "bfloat16" && b.itemsize == 2 && (is_format(b, 'h') || is_format(b, 'H'))) {
    type = StoreType::bf16;  // bf16 travels as its 16-bit pattern
  } else {
    fail(name + ": buffer format '" + b.format + "' does not hold " + dtype +
         " (supported: float32, float16, bfloat16)");
  }
  const py::ssize_t D = b.shape[2], N = b.shape[1];
  if ((D > 1 && b.strides[2] != b.itemsize) || (N > 1 && b.strides[1] != D * b.itemsize))
    fail(name + " must have contiguous [N, D] rows per head");
  if (b.strides[0] < 0 || b.strides[0] % b.itemsize != 0) fail(name + " has an unsupported head stride");
  hybridattn::StoreView v;
  v.data = b.ptr;
  v.type = type;
  v.n_heads = b.shape[0];
  v.n_tokens = N;
  v.dim = D;
  v.head_stride = b.strides[0] / b.itemsize;
  return v;
}

// The bytes a buffer spans, [lo, hi); empty when it holds no element. Named (name, or name[index] of a
// list) only where a message needs it: a decode step checks its buffers every call.
struct Span {
  const char* name;
  py::ssize_t index = -1;
  uintptr_t lo = 0, hi = 0;

  std::string label() const { return index < 0 ? name : std::string(name) + "[" + std::to_string(index) + "]"; }
};

Span span(const py::buffer_info& b, const char* name, py::ssize_t index = -1) {
  Span s{name, index};
  if (b.size == 0) return s;
  py::ssize_t below = 0, above = b.itemsize;
  for (py::ssize_t i = 0; i < b.ndim; ++i) {
    const py::ssize_t reach = (b.shape[i] - 1) * b.strides[i];
    (reach < 0 ? below : above) += reach;
  }
  s.lo = uintptr_t(b.ptr) - uintptr_t(-below);
  s.hi = uintptr_t(b.ptr) + uintptr_t(above);
  return s;
}

Span span(const hybridattn::StoreView& v, const char* name, py::ssize_t index = -1) {
  Span s{name, index};
  if (v.n_heads == 0 || v.n_tokens == 0 || v.dim == 0) return s;
  const int64_t item = v.type == StoreType::f32 ? 4 : 2;
  s.lo = uintptr_t(v.data);
  s.hi = s.lo + uintptr_t(((v.n_heads - 1) * v.head_stride + v.n_tokens * v.dim) * item);
  return s;
}

// A kernel writes its outputs while it still reads its inputs, ids among them: an output that shared
// memory with an input or another output could turn the ids it checked into others mid-call.
void expect_apart(const std::vector<Span>& outputs, const std::vector<Span>& inputs) {
  auto meet = [](const Span& a, const Span& b) { return a.lo < b.hi && b.lo < a.hi; };
  for (size_t i = 0; i < outputs.size(); ++i) {
    for (size_t j = i + 1; j < outputs.size(); ++j)
      if (meet(outputs[i], outputs[j])) fail(outputs[i].label() + " and " + outputs[j].label() + " share memory");
    for (const Span& in : inputs)
      if (meet(outputs[i], in)) fail(outputs[i].label() + " shares memory with " + in.label());
  }
}

// The per-query buffers of a call: q [.., Hq, D] and out like it, lse [.., Hq]
// (fp32), ids [.., Hkv, M] (int64), all contiguous, with `lead` leading batch
// dimensions that must agree.
struct QueryBuffers {
  py::buffer_info q, out, lse, ids;
};

// An ids buffer: int64, `ndim` dimensions, contiguous.
py::buffer_info request_ids(const py::buffer& ids, py::ssize_t ndim) {
  py::buffer_info b = ids.request();
  if (!is_int64(b)) fail("ids must be int64, got buffer format '" + b.format + "'");
  expect_ndim(b, "ids", ndim);
  expect_contiguous(b, "ids");
  return b;
}

QueryBuffers query_buffers(const py::buffer& q, const py::buffer& ids, const py::buffer& out, const py::buffer& lse,
                           py::ssize_t lead) {
  QueryBuffers c{request_float32(q, "q", lead + 2, false), request_float32(out, "out", lead + 2, true),
                 request_float32(lse, "lse", lead + 1, true), request_ids(ids, lead + 2)};
  const std::string dims = lead ? "B, " : "";
  if (c.out.shape != c.q.shape) fail("out must have shape [" + dims + "Hq, D] like q");
  for (py::ssize_t i = 0; i <= lead; ++i)
    if (c.lse.shape[i] != c.q.shape[i]) fail("lse must have shape [" + dims + "Hq]");
  for (py::ssize_t i = 0; i < lead; ++i)
    if (c.ids.shape[i] != c.q.shape[i]) fail("ids must have shape [B, Hkv, M] with the B of q");
  return c;
}

// out and lse apart from q, ids and the stores.
void expect_outputs_apart(const QueryBuffers& c, const std::vector<hybridattn::StoreView>& ks,
                          const std::vector<hybridattn::StoreView>& vs) {
  std::vector<Span> inputs{span(c.q, "q"), span(c.ids, "ids")};
  for (py::ssize_t b = 0; b < py::ssize_t(ks.size()); ++b) {
    inputs.push_back(span(ks[b], "k_stores", b));
    inputs.push_back(span(vs[b], "v_stores", b));
  }
  expect_apart({span(c.out, "out"), span(c.lse, "lse")}, inputs);
}

// q's head dim and the ids' rows against the store (the first one of a batch).
void expect_store_shape(const QueryBuffers& c, py::ssize_t lead, const hybridattn::StoreView& store) {
  const py::ssize_t D = c.q.shape[lead + 1];
  if (D != store.dim) fail("q has head dim " + std::to_string(D) + " but the store has " + std::to_string(store.dim));
  if (c.ids.shape[lead] != store.n_heads)
    fail("ids must have one row per KV head (" + std::to_string(store.n_heads) + "), got " +
         std::to_string(c.ids.shape[lead]));
}

// The fields GatherAttendArgs and GatherAttendBatchArgs share.
template <class Args>
void set_query_args(Args& a, const QueryBuffers& c, py::ssize_t lead, float scale, int n_threads, bool scalar) {
  a.q = static_cast<const float*>(c.q.ptr);
  a.n_q_heads = c.q.shape[lead];
  a.ids = static_cast<const int64_t*>(c.ids.ptr);
  a.n_ids = c.ids.shape[lead + 1];
  a.scale = scale;
  a.out = static_cast<float*>(c.out.ptr);
  a.lse = static_cast<float*>(c.lse.ptr);
  a.n_threads = n_threads;
  a.scalar = scalar;
}

void gather_attend(const py::buffer& q, const py::buffer& k, const py::buffer& v, const py::buffer& ids,
                   const py::buffer& out, const py::buffer& lse, const std::string& store_dtype, float scale,
                   int n_threads, bool scalar) {
  hybridattn::GatherAttendArgs a;
  a.k = store_view(k, "k_store", store_dtype);
  a.v = store_view(v, "v_store", store_dtype);
  const QueryBuffers c = query_buffers(q, ids, out, lse, 0);
  expect_store_shape(c, 0, a.k);
  expect_outputs_apart(c, {a.k}, {a.v});
  set_query_args(a, c, 0, scale, n_threads, scalar);
  hybridattn::check_args(a);  // shape errors surface before the GIL is released
  py::gil_scoped_release release;
  hybridattn::gather_attend(a);
}

// The stores of a batched call, one per sequence. `held` keeps each one alive
// while the GIL is released, whatever happens to the list meanwhile.
std::vector<hybridattn::StoreView> store_views(const py::list& stores, const char* name, py::ssize_t n_seqs,
                                               const std::string& dtype, std::vector<py::buffer>& held) {
  if (py::ssize_t(stores.size()) != n_seqs)
    fail(std::string(name) + " must hold one store per sequence (B = " + std::to_string(n_seqs) + "), got " +
         std::to_string(stores.size()));
  std::vector<hybridattn::StoreView> views;
  for (py::ssize_t b = 0; b < n_seqs; ++b) {
    const std::string item = std::string(name) + "[" + std::to_string(b) + "]";
    py::object obj = stores[b];
    if (!py::isinstance<py::buffer>(obj)) fail(item + " does not expose a buffer");
    held.push_back(py::reinterpret_borrow<py::buffer>(obj));
    views.push_back(store_view(held.back(), item, dtype));
  }
  return views;
}

void gather_attend_batch(const py::buffer& q, const py::list& k_stores, const py::list& v_stores,
                         const py::buffer& ids, const py::buffer& out, const py::buffer& lse,
                         const std::string& store_dtype, float scale, int n_threads, bool scalar) {
  const QueryBuffers c = query_buffers(q, ids, out, lse, 1);
  const py::ssize_t B = c.q.shape[0];
  std::vector<py::buffer> held;
  const std::vector<hybridattn::StoreView> ks = store_views(k_stores, "k_stores", B, store_dtype, held);
  const std::vector<hybridattn::StoreView> vs = store_views(v_stores, "v_stores", B, store_dtype, held);
  if (B > 0) expect_store_shape(c, 1, ks[0]);  // the others are checked against this one
  expect_outputs_apart(c, ks, vs);
  hybridattn::GatherAttendBatchArgs a;
  set_query_args(a, c, 1, scale, n_threads, scalar);
  a.n_seqs = B;
  a.k = ks.data();
  a.v = vs.data();
  hybridattn::check_batch_args(a);  // shape errors surface before the GIL is released
  py::gil_scoped_release release;
  hybridattn::gather_attend_batch(a);
}

void gather_scores(const py::buffer& q, const py::buffer& k, const py::buffer& ids, const py::buffer& out,
                   const std::string& store_dtype, int n_threads, bool scalar) {
  hybridattn::GatherScoresArgs a;
  a.k = store_view(k, "k_store", store_dtype);
  py::buffer_info qb = request_float32(q, "q", 2, false), ob = request_float32(out, "out", 2, true);
  py::buffer_info ib = request_ids(ids, 2);
  if (qb.shape[1] != a.k.dim)
    fail("q has head dim " + std::to_string(qb.shape[1]) + " but the store has " + std::to_string(a.k.dim));
  if (ib.shape[0] != a.k.n_heads)
    fail("ids must have one row per KV head (" + std::to_string(a.k.n_heads) + "), got " + std::to_string(ib.shape[0]));
  if (ob.shape[0] != qb.shape[0] || ob.shape[1] != ib.shape[1]) fail("out must have shape [Hq, M]");
  expect_apart({span(ob, "out")}, {span(qb, "q"), span(ib, "ids"), span(a.k, "k_store")});
  a.q = static_cast<const float*>(qb.ptr);
  a.n_q_heads = qb.shape[0];
  a.ids = static_cast<const int64_t*>(ib.ptr);
  a.n_ids = ib.shape[1];
  a.out = static_cast<float*>(ob.ptr);
  a.n_threads = n_threads;
  a.scalar = scalar;
  hybridattn::check_scores_args(a);  // shape errors surface before the GIL is released
  py::gil_scoped_release release;
  hybridattn::gather_scores(a);
}

// A buffer of `ndim` dimensions of the given format ('i' int32, 'q' int64, 'f' float32 or 'h' bfloat16,
// as its 16-bit pattern), contiguous, whose leading dimensions are `lead`.
py::buffer_info request_typed(const py::buffer& buf, const char* name, const std::vector<py::ssize_t>& lead,
                              py::ssize_t ndim, char type, bool writable) {
  py::buffer_info b = buf.request(writable);
  const bool ok = type == 'q'   ? is_int64(b)
                  : type == 'i' ? b.itemsize == 4 && (is_format(b, 'i') || is_format(b, 'l'))
                  : type == 'h' ? b.itemsize == 2 && (is_format(b, 'h') || is_format(b, 'H'))
                                : is_format(b, 'f');
  if (!ok)
    fail(std::string(name) + " must be " +
         (type == 'q' ? "int64" : type == 'i' ? "int32" : type == 'h' ? "bfloat16 (its 16-bit pattern)" : "float32") +
         ", got buffer format '" + b.format + "'");
  expect_ndim(b, name, ndim);
  expect_contiguous(b, name);
  for (size_t i = 0; i < lead.size(); ++i)
    if (b.shape[i] != lead[i])
      fail(std::string(name) + ": dimension " + std::to_string(i) + " is " + std::to_string(b.shape[i]) +
           ", expected " + std::to_string(lead[i]));
  return b;
}

// The rows of a product (hybridattn::RowSet): `rows` [R, D] bf16, item x's n_rows rows starting at row
// x * stride, and ids None or [X, M] int64. Every row an item may take must lie inside `rows`.
hybridattn::RowSet row_set(const py::buffer& rows, const py::object& ids, py::ssize_t n_items, py::ssize_t n_rows,
                           py::ssize_t stride, std::vector<Span>& inputs) {
  py::buffer_info rb = request_typed(rows, "rows", {}, 2, 'h', false);
  inputs.push_back(span(rb, "rows"));
  if (n_rows < 0 || stride < 0) fail("n_rows and stride must be >= 0");
  // (n_items - 1) * stride could overflow: the fit is tested by division
  if (n_items > 0 && n_rows > 0 &&
      (n_rows > rb.shape[0] || (n_items > 1 && stride > (rb.shape[0] - n_rows) / (n_items - 1))))
    fail("rows: " + std::to_string(n_items) + " items of " + std::to_string(n_rows) + " rows, " +
         std::to_string(stride) + " apart, do not fit in " + std::to_string(rb.shape[0]) + " rows");
  hybridattn::RowSet r;
  r.base = static_cast<const uint16_t*>(rb.ptr);
  r.n_rows = n_rows;
  r.n_taken = n_rows;
  r.stride = stride;
  r.dim = rb.shape[1];
  if (!ids.is_none()) {
    py::buffer_info ib = request_typed(ids.cast<py::buffer>(), "ids", {n_items}, 2, 'q', false);
    r.ids = static_cast<const int64_t*>(ib.ptr);  // the caller's array outlives the call
    inputs.push_back(span(ib, "ids"));
    r.n_taken = ib.shape[1];
  }
  return r;
}

// A row product's shared arguments (hybridattn::RowProductArgs) from its left operand `left` [X, G, *], its
// rows (`row_set`) and out [X, G, M] (by_row) or [X, G, D]; returns the left operand's buffer.
py::buffer_info row_product(hybridattn::RowProductArgs& a, const py::buffer& left, const char* name,
                            const py::buffer& rows, const py::object& ids, const py::buffer& out, py::ssize_t n_rows,
                            py::ssize_t stride, int n_threads, bool by_row) {
  py::buffer_info lb = request_typed(left, name, {}, 3, 'h', false);
  std::vector<Span> inputs{span(lb, name)};
  a.rows = row_set(rows, ids, lb.shape[0], n_rows, stride, inputs);
  const py::ssize_t cols = by_row ? a.rows.n_taken : a.rows.dim;
  py::buffer_info ob = request_typed(out, "out", {lb.shape[0], lb.shape[1], cols}, 3, 'h', true);
  expect_apart({span(ob, "out")}, inputs);
  a.out = static_cast<uint16_t*>(ob.ptr);
  a.n_items = lb.shape[0];
  a.group = lb.shape[1];
  a.n_threads = n_threads;
  return lb;
}

void query_dots(const py::buffer& q, const py::buffer& rows, const py::object& ids, const py::buffer& out,
                py::ssize_t n_rows, py::ssize_t stride, int n_threads, bool widened) {
  hybridattn::QueryDotsArgs a;
  py::buffer_info qb = row_product(a, q, "q", rows, ids, out, n_rows, stride, n_threads, true);
  if (a.rows.dim != qb.shape[2]) fail("q [X, G, D] and rows [R, D] must agree in D");
  a.q = static_cast<const uint16_t*>(qb.ptr);
  a.widened = widened;
  hybridattn::check_query_dots_args(a);  // shape and id errors surface before the GIL is released
  py::gil_scoped_release release;
  hybridattn::query_dots(a);
}

void weighted_rows(const py::buffer& w, const py::buffer& rows, const py::object& ids, const py::buffer& out,
                   py::ssize_t n_rows, py::ssize_t stride, int n_threads) {
  hybridattn::WeightedRowsArgs a;
  py::buffer_info wb = row_product(a, w, "w", rows, ids, out, n_rows, stride, n_threads, false);
  if (wb.shape[2] != a.rows.n_taken) fail("w [X, G, M] must weigh the M rows taken per item");
  a.w = static_cast<const uint16_t*>(wb.ptr);
  hybridattn::check_weighted_rows_args(a);
  py::gil_scoped_release release;
  hybridattn::weighted_rows(a);
}

void host_step(const py::buffer& q, const py::list& k_stores, const py::list& v_stores, const py::list& lists,
               const py::buffer& near, const py::buffer& blocks, const py::buffer& ranges, const py::buffer& lse,
               const py::buffer& out, const py::buffer& out_lse, const py::buffer& ids, const py::buffer& n_read,
               const py::buffer& n_rated, const py::buffer& block_reads, const py::buffer& threshold,
               const std::string& store_dtype, float scale, const py::buffer& qq_limit, const py::buffer& qq_prefix,
               int64_t block_size, bool lse_from_candidates,
               int n_threads, int64_t min_chunk, bool scalar) {
  py::buffer_info qb = request_float32(q, "q", 3, false);
  const py::ssize_t B = qb.shape[0], Hq = qb.shape[1], D = qb.shape[2];
  std::vector<py::buffer> held;
  const std::vector<hybridattn::StoreView> ks = store_views(k_stores, "k_stores", B, store_dtype, held);
  const std::vector<hybridattn::StoreView> vs = store_views(v_stores, "v_stores", B, store_dtype, held);
  // With no sequence there is no store to take Hkv from: near [0, Hkv, P] gives it.
  const py::buffer_info near_shape = request_typed(near, "near", {B}, 3, 'q', false);
  const py::ssize_t Hkv = B ? ks[0].n_heads : near_shape.shape[1];
  if (B && ks[0].dim != D) fail("q has head dim " + std::to_string(D) + " but the store has " + std::to_string(ks[0].dim));
  if (py::ssize_t(lists.size()) != B) fail("lists must hold one [Hkv, rows, L] int32 array per sequence");
  std::vector<const int32_t*> list_ptrs;
  std::vector<int64_t> list_rows;
  std::vector<Span> inputs{span(qb, "q")};
  for (py::ssize_t b = 0; b < B; ++b) {
    inputs.push_back(span(ks[b], "k_stores", b));
    inputs.push_back(span(vs[b], "v_stores", b));
  }
  py::ssize_t L = -1;
  for (py::ssize_t b = 0; b < B; ++b) {
    py::object obj = lists[b];
    if (!py::isinstance<py::buffer>(obj)) fail("lists[" + std::to_string(b) + "] does not expose a buffer");
    held.push_back(py::reinterpret_borrow<py::buffer>(obj));
    py::buffer_info lb = request_typed(held.back(), "lists[b]", {Hkv}, 3, 'i', false);
    if (lb.shape[1] > 0) {  // a sequence without rows (nothing indexed yet) holds no entries: any length
      if (L >= 0 && lb.shape[2] != L) fail("all lists with rows must have one length (their last dimension)");
      L = lb.shape[2];
    }
    inputs.push_back(span(lb, "lists", b));
    list_ptrs.push_back(static_cast<const int32_t*>(lb.ptr));
    list_rows.push_back(lb.shape[1]);
  }
  py::buffer_info nb = request_typed(near, "near", {B, Hkv}, 3, 'q', false);
  py::buffer_info bb = request_typed(blocks, "blocks", {B, Hkv}, 3, 'q', false);
  py::buffer_info rb = request_typed(ranges, "ranges", {B, hybridattn::kRanges, 2}, 3, 'q', false);
  py::buffer_info lb = request_typed(lse, "lse", {B, Hq}, 2, 'f', false);
  py::buffer_info ob = request_typed(out, "out", {B, Hq, D}, 3, 'f', true);
  py::buffer_info olb = request_typed(out_lse, "out_lse", {B, Hq}, 2, 'f', true);
  py::buffer_info ib = request_typed(ids, "ids", {B, Hkv}, 3, 'q', true);
  py::buffer_info nrb = request_typed(n_read, "n_read", {B, Hkv}, 2, 'q', true);
  py::buffer_info nrt = request_typed(n_rated, "n_rated", {B, Hkv}, 2, 'q', true);
  py::buffer_info brb = request_typed(block_reads, "block_reads", {B, Hkv}, 3, 'i', true);
  py::buffer_info tb = request_typed(threshold, "threshold", {B}, 1, 'f', false);
  py::buffer_info qlb = request_typed(qq_limit, "qq_limit", {B}, 1, 'q', false);
  py::buffer_info qpb = request_typed(qq_prefix, "qq_prefix", {B}, 1, 'q', false);
  using Named = std::pair<const py::buffer_info*, const char*>;
  for (const auto& [b, name] : {Named{&nb, "near"}, Named{&bb, "blocks"}, Named{&rb, "ranges"}, Named{&lb, "lse"},
                                Named{&tb, "threshold"}, Named{&qlb, "qq_limit"}, Named{&qpb, "qq_prefix"}})
    inputs.push_back(span(*b, name));
  expect_apart({span(ob, "out"), span(olb, "out_lse"), span(ib, "ids"), span(nrb, "n_read"), span(nrt, "n_rated"),
                span(brb, "block_reads")},
               inputs);
  hybridattn::HostStepArgs a;
  a.n_seqs = B;
  a.n_q_heads = Hq;
  a.q = static_cast<const float*>(qb.ptr);
  a.k = ks.data();
  a.v = vs.data();
  a.lists = list_ptrs.data();
  a.n_list_rows = list_rows.data();
  a.list_len = std::max<py::ssize_t>(L, 0);
  a.near = static_cast<const int64_t*>(nb.ptr);
  a.n_near = nb.shape[2];
  a.qq_limit = static_cast<const int64_t*>(qlb.ptr);
  a.qq_prefix = static_cast<const int64_t*>(qpb.ptr);
  a.blocks = static_cast<const int64_t*>(bb.ptr);
  a.n_chosen = bb.shape[2];
  a.block_size = block_size;
  a.ranges = static_cast<const int64_t*>(rb.ptr);
  a.lse = static_cast<const float*>(lb.ptr);
  a.lse_from_candidates = lse_from_candidates;
  a.scale = scale;
  a.threshold = static_cast<const float*>(tb.ptr);
  a.out = static_cast<float*>(ob.ptr);
  a.out_lse = static_cast<float*>(olb.ptr);
  a.ids = static_cast<int64_t*>(ib.ptr);
  a.cap = ib.shape[2];
  a.n_read = static_cast<int64_t*>(nrb.ptr);
  a.n_rated = static_cast<int64_t*>(nrt.ptr);
  a.block_reads = static_cast<int32_t*>(brb.ptr);
  a.n_count_blocks = brb.shape[2];
  a.n_threads = n_threads;
  a.min_chunk = min_chunk;
  a.scalar = scalar;
  hybridattn::check_host_step(a);  // shape errors surface before the GIL is released
  py::gil_scoped_release release;
  hybridattn::host_step(a);
}

void merge_attention(const py::buffer& o_a, const py::buffer& lse_a, const py::buffer& o_b, const py::buffer& lse_b,
                     const py::buffer& out, const py::buffer& lse) {
  py::buffer_info oa = request_float32(o_a, "o_a", 2, false), ob = request_float32(o_b, "o_b", 2, false);
  py::buffer_info la = request_float32(lse_a, "lse_a", 1, false), lb = request_float32(lse_b, "lse_b", 1, false);
  py::buffer_info oo = request_float32(out, "out", 2, true), lo = request_float32(lse, "lse", 1, true);
  const py::ssize_t H = oa.shape[0], D = oa.shape[1];
  for (const py::buffer_info* o : {&ob, &oo})
    if (o->shape[0] != H || o->shape[1] != D) fail("merge_attention: outputs must all have shape [H, D]");
  for (const py::buffer_info* l : {&la, &lb, &lo})
    if (l->shape[0] != H) fail("merge_attention: lse vectors must have shape [H]");
  py::gil_scoped_release release;
  hybridattn::merge_states(static_cast<const float*>(oa.ptr), static_cast<const float*>(la.ptr),
                           static_cast<const float*>(ob.ptr), static_cast<const float*>(lb.ptr), H, D,
                           static_cast<float*>(oo.ptr), static_cast<float*>(lo.ptr));
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hybridattn host kernels (gather-attend, gathered scores, the decode step's host side, log-sum-exp merge)";
  m.def("gather_attend", &gather_attend, py::arg("q"), py::arg("k_store"), py::arg("v_store"), py::arg("ids"),
        py::arg("out"), py::arg("lse"), py::arg("store_dtype"), py::arg("scale"), py::arg("n_threads") = 0, py::arg("scalar") = false,
        "Attend q [Hq, D] float32 to the rows ids [Hkv, M] of k/v stores [Hkv, N, D]; writes out [Hq, D], lse [Hq].");
  m.def("gather_attend_batch", &gather_attend_batch, py::arg("q"), py::arg("k_stores"), py::arg("v_stores"),
        py::arg("ids"), py::arg("out"), py::arg("lse"), py::arg("store_dtype"), py::arg("scale"),
        py::arg("n_threads") = 0, py::arg("scalar") = false,
        "gather_attend for B sequences in one call: q [B, Hq, D] float32, one k/v store [Hkv, N_b, D] per "
        "sequence, ids [B, Hkv, M] into each sequence's own stores; writes out [B, Hq, D], lse [B, Hq].");
  m.def("gather_scores", &gather_scores, py::arg("q"), py::arg("k_store"), py::arg("ids"), py::arg("out"),
        py::arg("store_dtype"), py::arg("n_threads") = 0, py::arg("scalar") = false,
        "q [Hq, D] float32 . the rows ids [Hkv, M] of a k store [Hkv, N, D]; writes out [Hq, M] (-inf at padding).");
  m.def("host_step", &host_step, py::arg("q"), py::arg("k_stores"), py::arg("v_stores"), py::arg("lists"),
        py::arg("near"), py::arg("blocks"), py::arg("ranges"), py::arg("lse"), py::arg("out"), py::arg("out_lse"),
        py::arg("ids"), py::arg("n_read"), py::arg("n_rated"), py::arg("block_reads"), py::arg("threshold"),
        py::arg("store_dtype"), py::arg("scale"), py::arg("qq_limit"), py::arg("qq_prefix"), py::arg("block_size"),
        py::arg("lse_from_candidates"), py::arg("n_threads") = 0, py::arg("min_chunk") = hybridattn::kMinHostChunk,
        py::arg("scalar") = false,
        "The host side of a decode step for B sequences (hybridattn/host_step.h): candidates, their rating, "
        "the gather-attend of those read, and the reads per block.");
  m.def("merge_attention", &merge_attention, py::arg("o_a"), py::arg("lse_a"), py::arg("o_b"), py::arg("lse_b"),
        py::arg("out"), py::arg("lse"), "Exact log-sum-exp merge of two partial attention states.");
  m.def("query_dots", &query_dots, py::arg("q"), py::arg("rows"), py::arg("ids"), py::arg("out"), py::arg("n_rows"),
        py::arg("stride"), py::arg("n_threads") = 0, py::arg("widened") = false,
        "q [X, G, D] . the rows of each item (bf16; rows [R, D], item x's n_rows from row x * stride, or those ids "
        "[X, M] names) -> out [X, G, M] bf16, rounded to nearest even: with AVX512-BF16 where the CPU has it and "
        "widened is false, else widened to fp32.");
  m.def("weighted_rows", &weighted_rows, py::arg("w"), py::arg("rows"), py::arg("ids"), py::arg("out"),
        py::arg("n_rows"), py::arg("stride"), py::arg("n_threads") = 0,
        "sum_m w[x, g, m] * row(x, m) (bf16 weights and rows, laid out as query_dots takes them) -> out [X, G, D] "
        "bf16, rounded to nearest even, from fp32 sums.");
  m.def("has_bf16_dots", &hybridattn::has_bf16_dots, "Whether query_dots runs AVX512-BF16 on this CPU.");
  m.def("max_threads", &max_threads, "Threads the kernels use by default.");
  m.attr("HOST_MIN_CHUNK") = hybridattn::kMinHostChunk;
  m.attr("MAX_RATE_GROUP") = hybridattn::kMaxRateGroup;
#ifdef _OPENMP
  m.attr("HAS_OPENMP") = true;
#else
  m.attr("HAS_OPENMP") = false;
#endif
}
