// Python bindings of the host kernels. Buffers arrive through the buffer
// protocol (numpy arrays, or torch CPU tensors viewed as numpy by engine.ops),
// are checked here for format, shape and layout, and are never copied: a
// wrong buffer raises instead of being silently converted.
#include <pybind11/pybind11.h>

#include <string>

#include "hybridattn/gather_attend.h"
#include "hybridattn/merge.h"

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
hybridattn::StoreView store_view(const py::buffer& buf, const char* name, const std::string& dtype) {
  py::buffer_info b = buf.request();
  expect_ndim(b, name, 3);
  StoreType type;
  if (dtype == "float32" && is_format(b, 'f')) {
    type = StoreType::f32;
  } else if (dtype == "float16" && is_format(b, 'e')) {
    type = StoreType::f16;
  } else if (dtype == "bfloat16" && b.itemsize == 2 && (is_format(b, 'h') || is_format(b, 'H'))) {
    type = StoreType::bf16;  // bf16 travels as its 16-bit pattern
  } else {
    fail(std::string(name) + ": buffer format '" + b.format + "' does not hold " + dtype +
         " (supported: float32, float16, bfloat16)");
  }
  const py::ssize_t D = b.shape[2], N = b.shape[1];
  if ((D > 1 && b.strides[2] != b.itemsize) || (N > 1 && b.strides[1] != D * b.itemsize))
    fail(std::string(name) + " must have contiguous [N, D] rows per head");
  if (b.strides[0] < 0 || b.strides[0] % b.itemsize != 0) fail(std::string(name) + " has an unsupported head stride");
  hybridattn::StoreView v;
  v.data = b.ptr;
  v.type = type;
  v.n_heads = b.shape[0];
  v.n_tokens = N;
  v.dim = D;
  v.head_stride = b.strides[0] / b.itemsize;
  return v;
}

void gather_attend(const py::buffer& q, const py::buffer& k, const py::buffer& v, const py::buffer& ids,
                   const py::buffer& out, const py::buffer& lse, const std::string& store_dtype, float scale,
                   int n_threads, bool scalar) {
  hybridattn::GatherAttendArgs a;
  a.k = store_view(k, "k_store", store_dtype);
  a.v = store_view(v, "v_store", store_dtype);
  py::buffer_info qb = request_float32(q, "q", 2, false);
  py::buffer_info ob = request_float32(out, "out", 2, true);
  py::buffer_info lb = request_float32(lse, "lse", 1, true);
  py::buffer_info ib = ids.request();
  if (!is_int64(ib)) fail("ids must be int64, got buffer format '" + ib.format + "'");
  expect_ndim(ib, "ids", 2);
  expect_contiguous(ib, "ids");

  const py::ssize_t Hq = qb.shape[0], D = qb.shape[1];
  if (D != a.k.dim) fail("q has head dim " + std::to_string(D) + " but the store has " + std::to_string(a.k.dim));
  if (ib.shape[0] != a.k.n_heads)
    fail("ids must have one row per KV head (" + std::to_string(a.k.n_heads) + "), got " +
         std::to_string(ib.shape[0]));
  if (ob.shape[0] != Hq || ob.shape[1] != D) fail("out must have shape [Hq, D] like q");
  if (lb.shape[0] != Hq) fail("lse must have shape [Hq]");

  a.q = static_cast<const float*>(qb.ptr);
  a.n_q_heads = Hq;
  a.ids = static_cast<const int64_t*>(ib.ptr);
  a.n_ids = ib.shape[1];
  a.scale = scale;
  a.out = static_cast<float*>(ob.ptr);
  a.lse = static_cast<float*>(lb.ptr);
  a.n_threads = n_threads;
  a.scalar = scalar;
  hybridattn::check_args(a);  // shape errors surface before the GIL is released
  py::gil_scoped_release release;
  hybridattn::gather_attend(a);
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
  m.doc() = "hybridattn host kernels (gather-attend, log-sum-exp merge)";
  m.def("gather_attend", &gather_attend, py::arg("q"), py::arg("k_store"), py::arg("v_store"), py::arg("ids"),
        py::arg("out"), py::arg("lse"), py::arg("store_dtype"), py::arg("scale"), py::arg("n_threads") = 0, py::arg("scalar") = false,
        "Attend q [Hq, D] float32 to the rows ids [Hkv, M] of k/v stores [Hkv, N, D]; writes out [Hq, D], lse [Hq].");
  m.def("merge_attention", &merge_attention, py::arg("o_a"), py::arg("lse_a"), py::arg("o_b"), py::arg("lse_b"),
        py::arg("out"), py::arg("lse"), "Exact log-sum-exp merge of two partial attention states.");
  m.def("max_threads", &max_threads, "Threads the kernels use by default.");
#ifdef _OPENMP
  m.attr("HAS_OPENMP") = true;
#else
  m.attr("HAS_OPENMP") = false;
#endif
}
