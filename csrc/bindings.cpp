// sparseinfer._C: the Python face of the CPU kernels (pybind11, no libtorch headers).
//
// Torch tensors are read through their Python attributes (dtype, shape, stride(), data_ptr(),
// device, layout), so the extension builds in seconds against nothing but pybind11. Every
// argument is checked here -- type, device, dtype, rank, shape, int32 range, strides, overlap --
// before a kernel sees a pointer, and kernel error codes become messages that name the shapes.
//
//   w = _C.pack_int4(qweight, scale, zero, K)      # once per weight (prepack): validates, keeps refs
//   _C.linear(x, w, out, bias, num_threads, isa)   # per call: checks x / out / bias, releases the GIL
//
// A Weight stays valid while torch moves or rewrites its tensors: see "weight lifetime" below.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "sparseinfer/decode.h"
#include "sparseinfer/dispatch.h"
#include "sparseinfer/kernels.h"
#include "sparseinfer/threadpool.h"

namespace py = pybind11;
using namespace sparseinfer;

namespace {

constexpr int64_t kInt32Max = 2147483647;

// -- torch objects, looked up once -----------------------------------------------------------------

struct TorchTypes {
  py::object tensor_type, strided;
  py::object dtypes[int(DType::unknown)];  // indexed by DType
  // interned attribute names: a per-call lookup by C string would build a new Python string each time
  py::str is_cpu, device, type, layout, dtype, shape, stride, data_ptr, version;
};

const TorchTypes& torch_types() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<TorchTypes> storage;
  return storage
      .call_once_and_store_result([] {
        py::module_ torch = py::module_::import("torch");
        TorchTypes t;
        t.tensor_type = torch.attr("Tensor");
        t.strided = torch.attr("strided");
        const char* names[] = {"float32", "bfloat16", "float16", "int8", "uint8", "int32", "int64"};
        for (int i = 0; i < int(DType::unknown); ++i) t.dtypes[i] = torch.attr(names[i]);
        const auto intern = [](const char* n) { return py::reinterpret_steal<py::str>(PyUnicode_InternFromString(n)); };
        t.is_cpu = intern("is_cpu"), t.device = intern("device"), t.type = intern("type"), t.layout = intern("layout");
        t.dtype = intern("dtype"), t.shape = intern("shape"), t.stride = intern("stride"), t.data_ptr = intern("data_ptr");
        t.version = intern("_version");
        return t;
      })
      .get_stored();
}

// -- tensor inspection -------------------------------------------------------------------------------

struct Tensor {
  std::string name;  // the argument name used in messages
  uintptr_t ptr = 0;
  DType dtype = DType::unknown;
  std::vector<int64_t> shape, strides;
  py::object obj, dtype_obj;

  // torch's name of the dtype, also for dtypes we do not know (built for messages only: it is slow)
  std::string dtype_str() const {
    std::string s = py::str(dtype_obj);
    return s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
  }

  int64_t dim() const { return int64_t(shape.size()); }
  std::string shape_str() const {
    std::ostringstream s;
    s << "(";
    for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
    s << (shape.size() == 1 ? ",)" : ")");
    return s.str();
  }
  std::string strides_str() const {
    std::ostringstream s;
    s << "(";
    for (size_t i = 0; i < strides.size(); ++i) s << (i ? ", " : "") << strides[i];
    s << (strides.size() == 1 ? ",)" : ")");
    return s.str();
  }
  std::string desc() const { return name + " " + dtype_str() + shape_str(); }
  // Bytes spanned from the first to one past the last element (0 if empty).
  int64_t extent_bytes() const {
    int64_t last = 0;
    for (size_t i = 0; i < shape.size(); ++i) {
      if (shape[i] == 0) return 0;
      last += (shape[i] - 1) * strides[i];
    }
    return (last + 1) * int64_t(dtype_size(dtype));
  }
};

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

// Sizes from a tuple of Python ints (torch.Size, stride()).
void int_tuple(py::handle tup, std::vector<int64_t>& out) {
  const Py_ssize_t n = PyTuple_GET_SIZE(tup.ptr());
  out.resize(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[size_t(i)] = PyLong_AsLongLong(PyTuple_GET_ITEM(tup.ptr(), i));
}

// Everything the checks need, read through Python attributes once per call (about a microsecond
// per tensor: no strings are built unless a message needs them).
Tensor inspect(py::handle obj, const char* name) {
  const TorchTypes& T = torch_types();
  if (!py::isinstance(obj, T.tensor_type))
    type_error(std::string(name) + " must be a torch.Tensor, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  Tensor t;
  t.name = name;
  t.obj = py::reinterpret_borrow<py::object>(obj);
  if (!obj.attr(T.is_cpu).cast<bool>())
    value_error(std::string(name) + " must be on the CPU, got device '" +
                std::string(py::str(obj.attr(T.device).attr(T.type))) + "'");
  if (!py::object(obj.attr(T.layout)).is(T.strided)) value_error(std::string(name) + " must be a dense (strided) tensor");
  t.dtype_obj = obj.attr(T.dtype);
  for (int i = 0; i < int(DType::unknown); ++i)
    if (t.dtype_obj.is(T.dtypes[i])) t.dtype = DType(i);
  int_tuple(obj.attr(T.shape), t.shape);
  int_tuple(obj.attr(T.stride)(), t.strides);
  t.ptr = obj.attr(T.data_ptr)().cast<uintptr_t>();
  return t;
}

std::string dtype_list(std::initializer_list<DType> ok) {
  std::string s;
  for (DType d : ok) s += (s.empty() ? "" : ", ") + std::string(dtype_name(d));
  return s;
}

void check_dtype(const Tensor& t, std::initializer_list<DType> ok) {
  for (DType d : ok)
    if (t.dtype == d) return;
  value_error(t.name + " must have dtype " + dtype_list(ok) + ", got " + t.dtype_str() + " (shape " + t.shape_str() + ")");
}

void check_dim(const Tensor& t, int64_t dim) {
  if (t.dim() != dim)
    value_error(t.name + " must be " + std::to_string(dim) + "-D, got shape " + t.shape_str());
}

// why: a string, or a function that builds one (only on failure: per-call checks of the hot path must
// not format shapes and weight descriptions on every call)
template <class Why>
void check_shape(const Tensor& t, const std::vector<int64_t>& want, const Why& why) {
  if (t.shape != want) {
    Tensor w;
    w.shape = want;
    std::string reason;
    if constexpr (std::is_invocable_v<Why>) reason = why();
    else reason = why;
    value_error(t.name + " must have shape " + w.shape_str() + " (" + reason + "), got " + t.shape_str());
  }
}

// Sizes the kernels index with 32-bit counters must fit (see kernels.h).
void check_int32(int64_t v, const std::string& what) {
  if (v > kInt32Max)
    value_error(what + " = " + std::to_string(v) + " is larger than INT32_MAX (2147483647), the largest size the "
                "CPU kernels support");
}

// Only dims of size > 1 matter: size-1 dims may carry any stride.
void check_contiguous(const Tensor& t) {
  int64_t expect = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expect)
      value_error(t.name + " must be contiguous, got shape " + t.shape_str() + " with strides " + t.strides_str() +
                  "; call .contiguous() first");
    expect *= t.shape[i];
  }
}

template <class T>
const T* data(const Tensor& t) { return reinterpret_cast<const T*>(t.ptr); }

// -- prepacked weights --------------------------------------------------------------------------------
//
// Weight lifetime. A Weight's view holds raw pointers into its source tensors and into buffers derived
// from them (row tiles, reordered codes, panels). Torch can move a tensor's memory without replacing the
// tensor object -- share_memory_() swaps the storage's allocation in place and frees the old one, set_()
// and `.data =` rebind it -- and can write it in place (copy_, load_state_dict), which leaves derived
// layouts stale. So a Weight records, per source tensor, the data_ptr() and _version it was built from,
// and every entry point that reads its memory calls ensure_current() first: when a source differs, the
// Weight is rebuilt by its repack function from the same tensor objects (validated again, as at pack
// time) and its derived buffers are dropped, to be rebuilt on next use. Derived buffers live in one
// reference-counted block that a call holds while it runs, so a rebuild by another thread never frees
// memory a kernel is reading. The check costs two attribute reads per source tensor.

struct Source {
  py::object tensor;     // keeps the tensor object alive (its current storage: whatever data_ptr() says)
  uintptr_t ptr = 0;     // data_ptr() when the view was built
  int64_t version = -1;  // _version then; -1: an inference tensor (no version counter: only moves are seen)
};

// Buffers derived from the sources and owned by the weight. Every prepacked layout goes here
// (alloc_derived), so a rebuild drops them all and a running call keeps them alive.
struct Derived {
  std::vector<std::shared_ptr<void>> buffers;
  size_t bytes = 0;
};

struct Weight {
  WeightView view;
  std::string fmt;                   // as in sparseinfer.formats: "int4", "2:4+int8", "csr", ...
  std::string detail;                // for repr and messages
  std::vector<Source> sources;       // every tensor the view points into (a nested Weight's too)
  std::function<Weight()> repack;    // the pack_* call that built this weight, on the same objects
  std::shared_ptr<Derived> derived = std::make_shared<Derived>();

  std::string desc() const {
    return "weight " + fmt + " of shape (" + std::to_string(view.N) + ", " + std::to_string(view.K) + ")";
  }
};

// An int attribute (or the result of calling it, for data_ptr()); false with the Python error cleared
// when it cannot be read (inference tensors have no _version).
bool read_int(PyObject* obj, PyObject* name, bool call, int64_t* out) {
  PyObject* v = call ? PyObject_VectorcallMethod(name, &obj, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr)
                     : PyObject_GetAttr(obj, name);
  if (v) {
    *out = int64_t(PyLong_AsUnsignedLongLongMask(v));
    Py_DECREF(v);
  }
  if (!v || PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

Source source_of(const Tensor& t) {
  Source s{t.obj, t.ptr, -1};
  int64_t version = 0;
  if (read_int(t.obj.ptr(), torch_types().version.ptr(), false, &version)) s.version = version;
  return s;
}

// Whether every source tensor is where, and as written, as when `sources` was recorded.
bool sources_current(const std::vector<Source>& sources) {
  const TorchTypes& T = torch_types();
  for (const Source& s : sources) {
    int64_t ptr = 0, version = -1;
    if (!read_int(s.tensor.ptr(), T.data_ptr.ptr(), true, &ptr) || uintptr_t(ptr) != s.ptr) return false;
    if (s.version >= 0 && (!read_int(s.tensor.ptr(), T.version.ptr(), false, &version) || version != s.version))
      return false;
  }
  return true;
}

bool sources_current(const Weight& w) { return sources_current(w.sources); }

// Rebuild `w` if a source tensor moved or was written since it was built. Raises the pack_* error when
// a source no longer fits (e.g. set_() to another shape); `w` then stays stale and keeps refusing.
void ensure_current(Weight& w) {
  if (sources_current(w)) return;
  Weight fresh = w.repack();
  w = std::move(fresh);
}

void check_k(int64_t k, int64_t kp, const std::string& what) {
  if (k < 1 || k > kp)
    value_error("K = " + std::to_string(k) + " must be in 1.." + std::to_string(kp) + " (the padded " + what + ")");
  check_int32(k, "K");
}

// Shared by int8 / int4: scale [N, G] with kp % G == 0.
QuantView quant_view(const Tensor& scale, int64_t n, int64_t kp, const std::string& fmt) {
  check_dtype(scale, {DType::f32});
  check_dim(scale, 2);
  const int64_t g_count = scale.shape[1];
  if (scale.shape[0] != n || g_count < 1 || kp % g_count != 0)
    value_error(fmt + ": scale of shape " + scale.shape_str() + " does not fit qweight with " + std::to_string(n) +
                " rows of " + std::to_string(kp) + " elements: expected (" + std::to_string(n) +
                ", G) with G dividing " + std::to_string(kp));
  check_int32(g_count, "scale groups");
  check_contiguous(scale);
  QuantView q;
  q.scale = data<float>(scale);
  q.kp = kp, q.n_groups = g_count, q.group = kp / g_count;
  return q;
}

Weight pack_int8(py::object qweight_obj, py::object scale_obj, int64_t k) {
  Tensor qw = inspect(qweight_obj, "qweight"), scale = inspect(scale_obj, "scale");
  check_dtype(qw, {DType::i8});
  check_dim(qw, 2);
  const int64_t n = qw.shape[0], kp = qw.shape[1];
  if (n < 1 || kp < 1) value_error("int8: qweight of shape " + qw.shape_str() + " is empty");
  check_int32(n, "N"), check_int32(kp, "padded K");
  check_k(k, kp, "row length of qweight");
  check_contiguous(qw);
  Weight w;
  w.view.q = quant_view(scale, n, kp, "int8");
  w.view.q.codes = data<int8_t>(qw);
  w.view.id = KernelId::int8, w.view.N = n, w.view.K = k;
  w.fmt = "int8";
  w.detail = "group " + std::to_string(w.view.q.group);
  w.sources = {source_of(qw), source_of(scale)};
  w.repack = [=] { return pack_int8(qweight_obj, scale_obj, k); };
  return w;
}

Weight pack_int4(py::object qweight_obj, py::object scale_obj, py::object zero_obj, int64_t k) {
  Tensor qw = inspect(qweight_obj, "qweight"), scale = inspect(scale_obj, "scale");
  check_dtype(qw, {DType::u8});
  check_dim(qw, 2);
  const int64_t n = qw.shape[0], kp = qw.shape[1] * 2;
  if (n < 1 || kp < 1) value_error("int4: qweight of shape " + qw.shape_str() + " is empty");
  check_int32(n, "N"), check_int32(kp, "padded K");
  check_k(k, kp, "row length of qweight, 2 per byte");
  check_contiguous(qw);
  Weight w;
  w.view.q = quant_view(scale, n, kp, "int4");
  w.view.q.codes = data<uint8_t>(qw);
  w.sources = {source_of(qw), source_of(scale)};
  if (!zero_obj.is_none()) {
    Tensor zero = inspect(zero_obj, "zero");
    check_dtype(zero, {DType::u8});
    check_shape(zero, scale.shape, "one zero point per scale");
    check_contiguous(zero);
    w.view.q.zero = data<uint8_t>(zero);
    w.sources.push_back(source_of(zero));
  }
  w.view.id = KernelId::int4, w.view.N = n, w.view.K = k;
  w.fmt = "int4";
  w.detail = "group " + std::to_string(w.view.q.group) + (w.view.q.zero ? ", asymmetric" : ", symmetric");
  w.repack = [=] { return pack_int4(qweight_obj, scale_obj, zero_obj, k); };
  return w;
}

int index_bits(int64_t m) {
  int b = 0;
  while ((int64_t(1) << b) < m) ++b;
  return b < 1 ? 1 : b;
}

Weight pack_nm(py::object meta_obj, int64_t n_keep, int64_t m, int64_t k, py::object values_obj) {
  if (m < 2 || n_keep < 1 || n_keep >= m || m > kInt32Max)
    value_error("N:M needs integers 1 <= n < m, got n=" + std::to_string(n_keep) + ", m=" + std::to_string(m));
  const std::string nm_name = std::to_string(n_keep) + ":" + std::to_string(m);
  Tensor meta = inspect(meta_obj, "meta");
  check_dtype(meta, {DType::u8});
  check_dim(meta, 2);
  const int64_t rows = meta.shape[0];
  if (rows < 1) value_error(nm_name + ": meta of shape " + meta.shape_str() + " is empty");
  check_int32(rows, "N");
  if (k < 1) value_error(nm_name + ": K = " + std::to_string(k) + " must be >= 1");
  check_int32(k, "K");
  const int bits = index_bits(m);
  const int64_t kc = (k + m - 1) / m * n_keep;
  check_int32(kc, "kept values per row");
  check_shape(meta, {rows, (kc * bits + 7) / 8},
              std::to_string(kc) + " kept values per row, " + std::to_string(bits) + " index bits each");
  check_contiguous(meta);

  Weight w;
  NMView& v = w.view.nm;
  v.n = int32_t(n_keep), v.m = int32_t(m), v.bits = bits, v.kc = kc;
  v.meta = data<uint8_t>(meta), v.meta_stride = meta.shape[1];
  w.view.N = rows, w.view.K = k;
  w.sources = {source_of(meta)};
  if (py::isinstance<Weight>(values_obj)) {  // N:M+int8 / N:M+int4: a prepacked (rows, kc) matrix
    Weight& q = values_obj.cast<Weight&>();
    ensure_current(q);  // a rebuild of this weight starts from current values
    if ((q.view.id != KernelId::int8 && q.view.id != KernelId::int4) || q.view.N != rows || q.view.K != kc)
      value_error(nm_name + ": quantized values must be an int8 or int4 weight of shape (" + std::to_string(rows) +
                  ", " + std::to_string(kc) + "), got " + q.desc());
    w.view.q = q.view.q;
    v.values = q.view.id == KernelId::int8 ? ValueKind::i8 : ValueKind::i4;
    w.view.id = q.view.id == KernelId::int8 ? KernelId::nm_int8 : KernelId::nm_int4;
    w.fmt = nm_name + "+" + q.fmt;
    w.detail = "values " + q.fmt + ", " + q.detail;
    w.sources.insert(w.sources.end(), q.sources.begin(), q.sources.end());  // the view copies q's pointers
  } else {
    Tensor values = inspect(values_obj, "values");
    check_dtype(values, {DType::f32, DType::bf16, DType::f16});
    check_shape(values, {rows, kc}, "rows x kept values per row");
    check_contiguous(values);
    v.values = values.dtype == DType::f32 ? ValueKind::f32 : values.dtype == DType::bf16 ? ValueKind::bf16 : ValueKind::f16;
    v.fvalues = reinterpret_cast<const void*>(values.ptr);
    w.view.id = KernelId::nm_float;
    w.fmt = nm_name;
    w.detail = "values " + values.dtype_str();
    w.sources.push_back(source_of(values));
  }
  w.repack = [=] { return pack_nm(meta_obj, n_keep, m, k, values_obj); };
  return w;
}

Weight pack_csr(py::object crow_obj, py::object col_obj, py::object values_obj, py::object scale_obj, int64_t k) {
  Tensor crow = inspect(crow_obj, "crow"), col = inspect(col_obj, "col"), values = inspect(values_obj, "values");
  check_dtype(crow, {DType::i64});
  check_dim(crow, 1);
  const int64_t rows = crow.shape[0] - 1;
  if (rows < 1) value_error("csr: crow of shape " + crow.shape_str() + " needs N + 1 >= 2 entries");
  check_int32(rows, "N");
  if (k < 1) value_error("csr: K = " + std::to_string(k) + " must be >= 1");
  check_int32(k, "K");
  check_dtype(col, {DType::i32});
  check_dim(col, 1);
  const int64_t nnz = col.shape[0];
  check_dtype(values, {DType::f32, DType::bf16, DType::f16, DType::i8});
  check_shape(values, {nnz}, "one value per column index");
  check_contiguous(crow), check_contiguous(col), check_contiguous(values);

  Weight w;
  CSRView& c = w.view.csr;
  c.crow = data<int64_t>(crow), c.col = data<int32_t>(col), c.values = reinterpret_cast<const void*>(values.ptr);
  c.nnz = nnz;
  w.sources = {source_of(crow), source_of(col), source_of(values)};
  const bool quantized = values.dtype == DType::i8;
  if (quantized) {
    if (scale_obj.is_none()) value_error("csr+int8: int8 values need a per-row scale of shape (" + std::to_string(rows) + ",)");
    Tensor scale = inspect(scale_obj, "scale");
    check_dtype(scale, {DType::f32});
    check_shape(scale, {rows}, "one scale per row");
    check_contiguous(scale);
    c.scale = data<float>(scale);
    c.kind = ValueKind::i8;
    w.sources.push_back(source_of(scale));
  } else {
    if (!scale_obj.is_none()) value_error("csr: float values take no scale (pass None)");
    c.kind = values.dtype == DType::f32 ? ValueKind::f32 : values.dtype == DType::bf16 ? ValueKind::bf16 : ValueKind::f16;
  }
  // The kernels index x with these: check every one once, here.
  if (c.crow[0] != 0 || c.crow[rows] != nnz)
    value_error("csr: crow must start at 0 and end at nnz = " + std::to_string(nnz) + ", got " +
                std::to_string(c.crow[0]) + " .. " + std::to_string(c.crow[rows]));
  for (int64_t r = 0; r < rows; ++r) {
    if (c.crow[r + 1] < c.crow[r])
      value_error("csr: crow decreases at row " + std::to_string(r) + " (" + std::to_string(c.crow[r]) + " -> " +
                  std::to_string(c.crow[r + 1]) + ")");
    // Strictly increasing within a row: a repeated column would be summed here but not by every
    // backend (the reference keeps one), so the answer would depend on which kernel runs.
    for (int64_t e = c.crow[r]; e < c.crow[r + 1]; ++e) {
      if (c.col[e] < 0 || c.col[e] >= k)
        value_error("csr: column index " + std::to_string(c.col[e]) + " at entry " + std::to_string(e) +
                    " is outside 0.." + std::to_string(k - 1));
      if (e > c.crow[r] && c.col[e] <= c.col[e - 1])
        value_error("csr: the column indices of row " + std::to_string(r) + " must be strictly increasing, got " +
                    std::to_string(c.col[e - 1]) + " then " + std::to_string(c.col[e]) + " at entries " +
                    std::to_string(e - 1) + ", " + std::to_string(e));
    }
  }
  w.view.id = quantized ? KernelId::csr_int8 : KernelId::csr_float;
  w.view.N = rows, w.view.K = k;
  w.fmt = quantized ? "csr+int8" : "csr";
  w.detail = "nnz " + std::to_string(nnz) + ", values " + values.dtype_str();
  w.repack = [=] { return pack_csr(crow_obj, col_obj, values_obj, scale_obj, k); };
  return w;
}

// -- ISA selection ---------------------------------------------------------------------------------------

std::string isa_list(const std::vector<Isa>& isas) {
  std::string s;
  for (Isa i : isas) s += (s.empty() ? "" : ", ") + std::string(isa_name(i));
  return s;
}

Isa resolve_isa(const py::object& isa) {
  if (isa.is_none()) {
    Isa active;
    std::string error;
    if (!active_isa(&active, &error)) value_error(error);
    return active;
  }
  if (!py::isinstance<py::str>(isa)) type_error("isa must be a string or None");
  const std::string name = isa.cast<std::string>();
  Isa want;
  if (!parse_isa(name, &want))
    value_error("unknown isa '" + name + "'; use one of scalar, avx2, avx512, neon (available here: " +
                isa_list(available_isas()) + ")");
  if (!isa_available(want))
    value_error("isa '" + name + "' is not available on this CPU / build (available: " + isa_list(available_isas()) + ")");
  return want;
}

// -- linear ------------------------------------------------------------------------------------------------

bool overlaps(const Tensor& a, const Tensor& b) {
  const int64_t ea = a.extent_bytes(), eb = b.extent_bytes();
  if (ea == 0 || eb == 0) return false;
  return a.ptr < b.ptr + uintptr_t(eb) && b.ptr < a.ptr + uintptr_t(ea);
}

// -- int8 activations ---------------------------------------------------------------------------------

// None is "auto" (sparseinfer.act resolves SPARSEINFER_ACT before it calls; the extension reads no
// environment for the mode).
ActMode resolve_act(const py::object& act) {
  ActMode mode = ActMode::auto_;
  if (act.is_none()) return mode;
  if (!py::isinstance<py::str>(act)) type_error("act must be a string or None");
  if (!parse_act_mode(act.cast<std::string>(), &mode)) {
    std::string known;
    for (const std::string& n : act_mode_names()) known += (known.empty() ? "" : ", ") + n;
    value_error("unknown act '" + act.cast<std::string>() + "'; use one of " + known);
  }
  return mode;
}

void free_aligned(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// A 64-byte aligned buffer for a layout derived from w's sources, owned by w.derived (size rounded up
// to whole 64-byte lines, as aligned_alloc requires). Dropped when w is rebuilt (ensure_current).
void* alloc_derived(Weight& w, size_t bytes) {
  bytes = (bytes + 63) / 64 * 64;
#if defined(_WIN32)
  void* p = _aligned_malloc(bytes, 64);
#else
  void* p = std::aligned_alloc(64, bytes);
#endif
  if (!p) throw std::bad_alloc();
  w.derived->buffers.emplace_back(p, free_aligned);
  w.derived->bytes += bytes;
  return p;
}

// The int8-activation layout of a weight, built once (per rebuild: see ensure_current), on the first call
// that can use it, under the GIL (so concurrent first calls build it once): row tiles of int8 / int4 (kernels.h, QTileView),
// reordered codes of 2:4 + int8 / int4 (NMView::Q8, ref/nm_q8_prepack_ref.cpp), or for a kernel row that reads
// row tiles (kReadsQTiles) those of the 2:4 weight made dense (twice its codes). They cost about as
// much memory as the canonical codes, which is why fp32-mode users never pay for them.
void ensure_qtiles(Weight& w, const KernelImpl& k) {
  const KernelId id = w.view.id;
  if (k.requires & kReadsQTiles) {  // 2:4 made dense (kernels.h, build_nm_qtiles)
    if (!w.view.qt.codes) w.view.qt = build_nm_qtiles(w.view, alloc_derived(w, nm_qtile_bytes(w.view)));
    // and squeezed (kernels.h, QTileView::compact): cannot fail on 2:4 + int8 (2 kept of every 4 columns)
    if ((k.requires & kReadsCompactTiles) && !w.view.qt.compact &&
        !build_qtile_compact(w.view.qt, alloc_derived(w, qtile_compact_bytes(w.view.qt))))
      throw std::runtime_error("sparseinfer: compact row tiles of " + w.desc() + " could not be built");
  } else if ((id == KernelId::nm_int8 || id == KernelId::nm_int4) && !w.view.nm.q8.codes) {
    const size_t bytes = nm_q8_prepack_bytes(w.view);
    if (bytes) w.view.nm.q8 = nm_q8_prepack(w.view, alloc_derived(w, bytes));  // 0: a layout only exact kernels take
  } else if ((id == KernelId::int8 || id == KernelId::int4) && !w.view.qt.codes) {
    const int bits = id == KernelId::int8 ? 8 : 4;
    w.view.qt = build_qtiles(w.view.q, w.view.N, bits, alloc_derived(w, qtile_bytes(w.view.q, w.view.N, bits)));
  }
}

// kReadsQTiles for selection: the weight has row tiles, or (N:M) can have them built on first use;
// kReadsCompactTiles too if they have, or can have, compact steps (2:4 + int8).
uint64_t tile_bits(const Weight& w) {
  const KernelId id = w.view.id;
  const bool nm = (id == KernelId::nm_int8 || id == KernelId::nm_int4) && nm_qtiles_supported(w.view);
  if (!w.view.qt.codes && !nm) return 0;
  const bool compact = w.view.qt.compact || (nm && id == KernelId::nm_int8);
  return kReadsQTiles | (compact ? uint64_t(kReadsCompactTiles) : 0);
}

// A ValueError unless the kernel row `named` may run `w` on `isa` in activation mode `act`.
void check_named_kernel(const std::string& named, const Weight& w, Isa isa, ActMode act, const std::string& what) {
  const uint64_t bits = act_call_bits(act);
  if (!find_kernel(named.c_str(), w.view.id, isa, bits ? bits | tile_bits(w) : 0))
    value_error(what + "kernel '" + named + "' cannot run " + w.desc() + " on isa " + isa_name(isa) + " with act='" +
                act_mode_name(act) + "' (kernel_candidates lists those that can)");
}

// Build w's int8-activation layout if the kernel a call of M rows runs (`named`, else the table's pick)
// takes int8 activations: only then (after ensure_current: nothing runs between this and the kernel).
void prepare_int8_act(Weight& w, Isa isa, ActMode act, const char* named, int64_t M) {
  if (const uint64_t bits = act_call_bits(act)) {
    const uint64_t sel = bits | tile_bits(w);
    const KernelImpl* k = named ? find_kernel(named, w.view.id, isa, sel) : select_kernel(w.view.id, isa, M, sel);
    if (k && (k->requires & kCallInt8Act)) ensure_qtiles(w, *k);
  }
}

// Rows of a [..., C] tensor as one 2-D matrix: M = prod(leading dims) and the stride between rows,
// if the leading dims collapse into one (as a view would); false if they do not.
bool collapse_rows(const Tensor& t, int64_t* M, int64_t* stride_m) {
  const int64_t d = t.dim();
  *M = 1;
  *stride_m = t.shape[size_t(d - 1)];
  for (int64_t i = 0; i < d - 1; ++i)
    if (t.shape[size_t(i)] == 0) return *M = 0, true;  // no rows: any strides will do
  int64_t inner = -1;  // stride of the innermost leading dim of size > 1 times its size, seen so far
  for (int64_t i = d - 2; i >= 0; --i) {
    const int64_t size = t.shape[size_t(i)], stride = t.strides[size_t(i)];
    *M *= size;
    if (size == 1) continue;
    if (inner < 0) *stride_m = stride;
    else if (stride != inner) return false;
    inner = stride * size;
  }
  return true;
}

py::object linear(py::handle x_obj, Weight& w, py::handle out_obj, py::handle bias_obj, int64_t num_threads,
                  const py::object& isa_obj, const py::object& act_obj, const py::object& kernel_obj) {
  const int64_t N = w.view.N, K = w.view.K;
  Tensor x = inspect(x_obj, "x");
  check_dtype(x, {DType::f32, DType::bf16, DType::f16});
  if (x.dim() < 1 || x.shape.back() != K)
    value_error("x of shape " + x.shape_str() + " does not match " + w.desc() + ": expected (..., " +
                std::to_string(K) + ")");
  int64_t M = 0, stride_xm = 0;
  if ((K > 1 && x.strides.back() != 1) || !collapse_rows(x, &M, &stride_xm))
    value_error("x must have unit stride along K and rows that form one matrix, got shape " + x.shape_str() +
                " with strides " + x.strides_str() + "; call .contiguous() first");
  check_int32(M, "M (rows of x)");

  Tensor out = inspect(out_obj, "out");
  if (out.dtype != x.dtype)
    value_error("out must have the dtype of x (" + x.dtype_str() + "), got " + out.dtype_str());
  std::vector<int64_t> want(x.shape);
  want.back() = N;
  check_shape(out, want, [&] { return "x's leading dims and N for x " + x.shape_str() + " and " + w.desc(); });
  int64_t M_out = 0, stride_ym = 0;
  if ((N > 1 && out.strides.back() != 1) || !collapse_rows(out, &M_out, &stride_ym) || (M > 1 && stride_ym < N))
    value_error("out must have unit stride along N and non-overlapping rows that form one matrix, got shape " +
                out.shape_str() + " with strides " + out.strides_str());
  if (overlaps(out, x)) value_error("out must not overlap x");

  LinearCall call{};
  call.x = reinterpret_cast<const void*>(x.ptr), call.x_dtype = x.dtype, call.stride_xm = M > 1 ? stride_xm : K;
  call.y = reinterpret_cast<void*>(out.ptr), call.stride_ym = M > 1 ? stride_ym : N;
  call.M = M;
  call.bias = nullptr, call.bias_dtype = DType::f32;
  if (!bias_obj.is_none()) {
    Tensor bias = inspect(bias_obj, "bias");
    check_dtype(bias, {DType::f32, DType::bf16, DType::f16});
    check_shape(bias, {N}, [&] { return "one per output feature of " + w.desc(); });
    check_contiguous(bias);
    if (overlaps(out, bias)) value_error("out must not overlap bias");
    call.bias = reinterpret_cast<const void*>(bias.ptr), call.bias_dtype = bias.dtype;
  }
  if (num_threads < 1) value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  const Isa isa = resolve_isa(isa_obj);
  call.act = resolve_act(act_obj);
  std::string named;
  if (!kernel_obj.is_none()) {
    if (!py::isinstance<py::str>(kernel_obj)) type_error("kernel must be a string or None");
    named = kernel_obj.cast<std::string>();
    check_named_kernel(named, w, isa, call.act, "");
    call.kernel = named.c_str();
  }
  ensure_current(w);  // after every other Python call: nothing runs between this and the kernel
  prepare_int8_act(w, isa, call.act, call.kernel, M);

  const KernelImpl* kernel = nullptr;
  Status s;
  {
    const WeightView view = w.view;  // a copy: another thread may build this weight's tiles meanwhile
    const std::shared_ptr<Derived> derived = w.derived;  // and rebuild it: keep the buffers view points into
    py::gil_scoped_release release;
    s = run_linear(call, view, isa, int(num_threads < 4096 ? num_threads : 4096), &kernel);
  }
  if (s != Status::ok) {
    const std::string msg = std::string("sparseinfer._C.linear: ") + status_message(s) + " in kernel " +
                            (kernel ? kernel->name : "<none>") + " (isa " + isa_name(isa) + ") for x " +
                            x.dtype_str() + x.shape_str() + " and " + w.desc() + " [" + w.detail + "]";
    if (s == Status::out_of_memory) throw std::bad_alloc();
    throw std::runtime_error(msg);
  }
  return py::reinterpret_borrow<py::object>(out_obj);
}

// -- attention over whole sequences ------------------------------------------------------------------

// out[B, Lq, H, D] = attention of q [B, H, Lq, D] over k, v [B, Hkv, Lk, D] (dispatch.h, AttentionCall).
bool attention(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle out_obj, py::handle mask_obj,
               double scale, bool causal, int64_t num_threads, const py::object& isa_obj) {
  Tensor q = inspect(q_obj, "q"), k = inspect(k_obj, "k"), v = inspect(v_obj, "v"), out = inspect(out_obj, "out");
  for (const Tensor* t : {&q, &k, &v, &out}) {
    check_dtype(*t, {DType::f32});
    check_dim(*t, 4);
  }
  const int64_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3], Hkv = k.shape[1], Lk = k.shape[2];
  check_shape(k, {B, Hkv, Lk, D}, "batch and head size of q");
  check_shape(v, {B, Hkv, Lk, D}, "the shape of k");
  if (Hkv < 1 || H % Hkv)
    value_error("q's " + std::to_string(H) + " heads must be a multiple of k's " + std::to_string(Hkv) + " (grouped-query)");
  if (H < 1 || D < 1) value_error("q must have at least one head of size >= 1, got " + q.shape_str());
  for (const Tensor* t : {&q, &k, &v})
    if (t->shape[3] > 1 && t->strides[3] != 1)
      value_error(t->name + " must have unit stride along its last dim (head size), got strides " + t->strides_str());
  check_shape(out, {B, Lq, H, D}, "batch, query rows, heads and head size of q");
  check_contiguous(out);
  for (const Tensor* t : {&q, &k, &v})
    if (overlaps(out, *t)) value_error("out must not overlap " + t->name);
  for (int64_t n : {B * H * Lq, B * Hkv * Lk, Lk, D}) check_int32(n, "an attention size");
  AttentionCall c;
  if (!mask_obj.is_none()) {
    Tensor mask = inspect(mask_obj, "mask");
    check_dtype(mask, {DType::u8});
    check_dim(mask, 4);
    const int64_t mb = mask.shape[0], mh = mask.shape[1], mr = mask.shape[2];
    if ((mb != 1 && mb != B) || mh != 1 || (mr != 1 && mr != Lq) || mask.shape[3] != Lk)
      value_error("mask must have shape (" + std::to_string(B) + " or 1, 1, " + std::to_string(Lq) + " or 1, " +
                  std::to_string(Lk) + ") for q " + q.shape_str() + " and k " + k.shape_str() + ", got " + mask.shape_str());
    c.mask = data<uint8_t>(mask), c.mask_rows = mr;
    c.mask_stride[0] = mb == 1 ? 0 : mask.strides[0], c.mask_stride[1] = mask.strides[2], c.mask_stride[2] = mask.strides[3];
  }
  if (!(scale == scale) || scale > 3.0e38 || scale < -3.0e38) value_error("scale must be a finite float");
  if (num_threads < 1) value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  c.q = data<float>(q), c.k = data<float>(k), c.v = data<float>(v), c.out = reinterpret_cast<float*>(out.ptr);
  c.B = B, c.H = H, c.Hkv = Hkv, c.Lq = Lq, c.Lk = Lk, c.D = D;
  for (int i = 0; i < 3; ++i) c.q_stride[i] = q.strides[i], c.k_stride[i] = k.strides[i], c.v_stride[i] = v.strides[i];
  c.scale = float(scale), c.causal = causal;
  const Isa isa = resolve_isa(isa_obj);
  Status s = Status::ok;
  bool keys_only;
  {
    py::gil_scoped_release release;
    keys_only = mask_hides_keys_only(c);
    if (keys_only) s = run_attention(c, isa, int(num_threads < 4096 ? num_threads : 4096));
  }
  if (s == Status::out_of_memory) throw std::bad_alloc();
  if (s != Status::ok)
    throw std::runtime_error(std::string("sparseinfer._C.attention: ") + status_message(s) + " for q " + q.shape_str() +
                             " and k " + k.shape_str());
  return keys_only;
}

// out[r - row_begin, :] = row r of w dequantized, r in [row_begin, row_end): the dense fallback's tiles.
py::object dequantize(Weight& w, int64_t row_begin, int64_t row_end, py::handle out_obj, int64_t num_threads) {
  if (row_begin < 0 || row_end > w.view.N || row_begin >= row_end)
    value_error("dequantize: rows " + std::to_string(row_begin) + ":" + std::to_string(row_end) + " are not within 0:" +
                std::to_string(w.view.N) + " of " + w.desc());
  Tensor out = inspect(out_obj, "out");
  check_dtype(out, {DType::f32});
  check_shape(out, {row_end - row_begin, w.view.K}, "the rows asked for and K of " + w.desc());
  check_contiguous(out);
  if (num_threads < 1) value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  ensure_current(w);  // sources written in place since: validated again (an index out of range would write out of bounds)
  Status s;
  {
    const WeightView view = w.view;
    const std::shared_ptr<Derived> derived = w.derived;  // keep the buffers the view points into
    py::gil_scoped_release release;
    s = dequantize_rows(view, row_begin, row_end, reinterpret_cast<float*>(out.ptr), w.view.K,
                        int(num_threads < 4096 ? num_threads : 4096));
  }
  if (s != Status::ok) throw std::runtime_error(std::string("sparseinfer._C.dequantize: ") + status_message(s) + " for " +
                                                w.desc());
  return py::reinterpret_borrow<py::object>(out_obj);
}

std::string kernel_name(const Weight& w, int64_t batch, const py::object& isa_obj, const py::object& act_obj) {
  if (batch < 0) value_error("batch must be >= 0, got " + std::to_string(batch));
  const uint64_t bits = act_call_bits(resolve_act(act_obj));
  const KernelImpl* k = select_kernel(w.view.id, resolve_isa(isa_obj), batch, bits ? bits | tile_bits(w) : 0);
  return k ? k->name : "none";
}

py::list kernel_candidate_names(const Weight& w, int64_t batch, const py::object& isa_obj, const py::object& act_obj) {
  if (batch < 0) value_error("batch must be >= 0, got " + std::to_string(batch));
  const uint64_t bits = act_call_bits(resolve_act(act_obj));
  py::list out;
  for (const KernelImpl* k : kernel_candidates(w.view.id, resolve_isa(isa_obj), batch, bits ? bits | tile_bits(w) : 0))
    out.append(py::str(k->name));
  return out;
}

// -- the native decode step ----------------------------------------------------------------------------

// One linear call of a decode step, writing at `offset` of the output: a packed weight run by the
// kernel and activation mode its layer's route picked at M = 1 (sparseinfer/backends/cpu.py,
// direct_call), or an fp32 matrix (a dense layer, or the fp32 copy a dense-routed packed layer keeps)
// run by decode.h's gemv.
struct Projection {
  py::object owner;  // keeps the Weight alive
  Weight* w = nullptr;  // nullptr: dense
  Tensor dense;  // [N, K] float32, contiguous; checked on every step like the caches
  // for an fp32 copy of a packed weight: that weight's tensors as they were when the decoder was built
  // (the copy's), checked on every step (the Weight itself may have been rebuilt meanwhile)
  std::vector<Source> copied_from;
  std::string what;  // for messages
  int64_t n = 0;
  std::vector<float> bias;  // empty: none
  ActMode act = ActMode::fp32;
  std::string kernel;  // empty: the table's pick
  int64_t offset = 0;
};

struct DecoderLayer {
  std::vector<float> norm1, norm2;
  float eps1 = 0, eps2 = 0;
  std::vector<Projection> qkv, gate_up;  // side by side into one buffer
  Projection o, down;
};

// A causal LM's batch-1 decode step (sparseinfer/lean_llama.py), every projection a packed kernel or an
// fp32 matrix:
// per layer RMSNorm, q/k/v, rotary, the KV cache write, attention, o, residual, RMSNorm, gate / up,
// SiLU gate, down, residual; then the final RMSNorm and, when given, the LM head. One Python call per
// token and one parallel region (the stages below): the math between the kernels is decode.h's, the
// kernels and their arguments are run_linear's (prepare_row_call). The norm weights,
// biases and rotary tables are copied at construction; the KV caches are the caller's tensors (its
// prefill writes them), checked on every step; the packed weights are revalidated on every step
// (ensure_current), as _C.linear does on every call.
class Decoder {
 public:
  Decoder(py::tuple dims, py::handle cos_obj, py::handle sin_obj, py::handle k_obj, py::handle v_obj, py::list layers,
          py::handle norm_obj, double eps, py::object head, int64_t num_threads, const py::object& isa_obj) {
    if (dims.size() != 6) value_error("Decoder: dims must be (hidden, heads, kv_heads, head_dim, intermediate, scale)");
    hidden_ = dims[0].cast<int64_t>(), heads_ = dims[1].cast<int64_t>(), kv_heads_ = dims[2].cast<int64_t>();
    head_dim_ = dims[3].cast<int64_t>(), intermediate_ = dims[4].cast<int64_t>(), scale_ = dims[5].cast<float>();
    if (hidden_ < 1 || heads_ < 1 || kv_heads_ < 1 || heads_ % kv_heads_ || head_dim_ < 2 || head_dim_ % 2 ||
        intermediate_ < 1)
      value_error("Decoder: dims (hidden, heads, kv_heads, head_dim, intermediate) = (" + std::to_string(hidden_) +
                  ", " + std::to_string(heads_) + ", " + std::to_string(kv_heads_) + ", " + std::to_string(head_dim_) +
                  ", " + std::to_string(intermediate_) + ") must be positive, heads a multiple of kv_heads and "
                  "head_dim even");
    if (num_threads < 1) value_error("Decoder: num_threads must be >= 1, got " + std::to_string(num_threads));
    threads_ = int(num_threads < 4096 ? num_threads : 4096);
    isa_ = resolve_isa(isa_obj);
    ops_ = decode_ops(isa_);
    const int64_t n_layers = int64_t(layers.size());
    if (n_layers < 1) value_error("Decoder: no layers");

    Tensor k = inspect(k_obj, "k_cache"), v = inspect(v_obj, "v_cache");
    check_dtype(k, {DType::f32, DType::f16}), check_dtype(v, {DType::f32, DType::f16});
    if (k.dtype != v.dtype) value_error("Decoder: k_cache and v_cache must have one dtype (float32 or float16)");
    kv_f16_ = k.dtype == DType::f16;
    check_dim(k, 4);
    max_len_ = k.shape[2];
    if (max_len_ < 1) value_error("Decoder: k_cache holds no positions");
    const std::vector<int64_t> cache_shape{n_layers, kv_heads_, max_len_, head_dim_};
    check_shape(k, cache_shape, "layers, kv_heads, max_len, head_dim");
    check_shape(v, cache_shape, "layers, kv_heads, max_len, head_dim");
    check_contiguous(k), check_contiguous(v);
    if (overlaps(k, v)) value_error("Decoder: k_cache and v_cache overlap");
    k_ = k, v_ = v;
    cos_ = copy_floats(cos_obj, "cos", {max_len_, head_dim_});
    sin_ = copy_floats(sin_obj, "sin", {max_len_, head_dim_});
    norm_ = copy_floats(norm_obj, "norm", {hidden_});
    eps_ = float(eps);

    const int64_t q_width = heads_ * head_dim_, qkv_width = (heads_ + 2 * kv_heads_) * head_dim_;
    for (int64_t i = 0; i < n_layers; ++i) {
      py::tuple t = layers[size_t(i)].cast<py::tuple>();
      if (t.size() != 8) value_error("Decoder: a layer is (norm1, eps1, qkv, o, norm2, eps2, gate_up, down)");
      const std::string at = "layer " + std::to_string(i) + " ";
      DecoderLayer L;
      L.norm1 = copy_floats(t[0], (at + "norm1").c_str(), {hidden_}), L.eps1 = t[1].cast<float>();
      L.qkv = projections(t[2], hidden_, qkv_width, at + "q/k/v");
      L.o = projections(py::make_tuple(t[3]), q_width, hidden_, at + "o")[0];
      L.norm2 = copy_floats(t[4], (at + "norm2").c_str(), {hidden_}), L.eps2 = t[5].cast<float>();
      L.gate_up = projections(t[6], hidden_, 2 * intermediate_, at + "gate/up");
      L.down = projections(py::make_tuple(t[7]), intermediate_, hidden_, at + "down")[0];
      layers_.push_back(std::move(L));
    }
    if (!head.is_none()) {
      head_ = projections(py::make_tuple(head), hidden_, -1, "head");
      vocab_ = head_[0].n;
    }
    x_.resize(size_t(hidden_)), h_.resize(size_t(hidden_)), tmp_.resize(size_t(hidden_));
    qkv_.resize(size_t(qkv_width)), att_.resize(size_t(q_width));
    gate_up_.resize(size_t(2 * intermediate_)), act_.resize(size_t(intermediate_));
    scores_.resize(size_t(heads_ * max_len_));  // a task's heads x its positions: disjoint across tasks
    part_m_.resize(size_t(kMaxParts * heads_)), part_l_.resize(part_m_.size());
    part_o_.resize(part_m_.size() * size_t(head_dim_));
    for (DecoderLayer& L : layers_) {
      for (Projection& p : L.qkv) all_.push_back(&p);
      all_.push_back(&L.o);
      for (Projection& p : L.gate_up) all_.push_back(&p);
      all_.push_back(&L.down);
    }
    for (Projection& p : head_) all_.push_back(&p);
    views_.resize(all_.size()), holds_.resize(all_.size()), calls_.resize(all_.size());
    for (const DecoderLayer& L : layers_) {
      first_.push_back(inputs_.size());
      for (size_t j = 0; j < L.qkv.size(); ++j) inputs_.push_back(h_.data()), outputs_.push_back(qkv_.data());
      inputs_.push_back(att_.data()), outputs_.push_back(tmp_.data());
      for (size_t j = 0; j < L.gate_up.size(); ++j) inputs_.push_back(h_.data()), outputs_.push_back(gate_up_.data());
      inputs_.push_back(act_.data()), outputs_.push_back(tmp_.data());
    }
    if (!head_.empty()) inputs_.push_back(h_.data()), outputs_.push_back(nullptr);  // out, set per step
    for (const Projection* p : all_) {  // run_linear's split of a batch-1 call
      const int64_t work = p->n * (p->w ? work_per_column(p->w->view) : p->dense.shape[1]);
      piece_rows_.push_back(column_chunk(p->n, work, kMinStreamWorkPerThread, kPiecesPerThread * threads_));
    }
    build_plan();
  }

  // x [hidden] (the token's embedding) at position pos -> out: the logits [vocab] with a head, else the
  // final norm's output [hidden].
  py::object step(py::handle x_obj, int64_t pos, py::handle out_obj) {
    Tensor x = inspect(x_obj, "x"), out = inspect(out_obj, "out");
    check_dtype(x, {DType::f32}), check_dtype(out, {DType::f32});
    if (x.extent_bytes() != hidden_ * 4 || int64_t(x.shape.empty() ? 1 : x.shape.back()) != hidden_)
      value_error("Decoder.step: x must hold one row of " + std::to_string(hidden_) + " values, got shape " + x.shape_str());
    check_contiguous(x), check_contiguous(out);
    const int64_t out_n = head_.empty() ? hidden_ : vocab_;
    if (out.extent_bytes() != out_n * 4)
      value_error("Decoder.step: out must hold " + std::to_string(out_n) + " values, got shape " + out.shape_str());
    if (pos < 0 || pos >= max_len_)
      value_error("Decoder.step: position " + std::to_string(pos) + " is outside the cache's 0.." +
                  std::to_string(max_len_ - 1));
    check_unmoved(k_), check_unmoved(v_);  // the caches must still be where and what they were
    for (size_t i = 0; i < all_.size(); ++i) {
      Projection& p = *all_[i];
      if (!p.w) {
        check_unmoved(p.dense);
        if (!sources_current(p.copied_from))
          value_error("Decoder.step: " + p.what + ": its packed weight was written or moved since the decoder was "
                      "built, so the fp32 copy it runs is stale; build a new decoder");
        continue;
      }
      ensure_current(*p.w);
      prepare_int8_act(*p.w, isa_, p.act, p.kernel.empty() ? nullptr : p.kernel.c_str(), 1);
      views_[i] = p.w->view, holds_[i] = p.w->derived;
    }
    Status s = Status::ok;
    const KernelImpl* kernel = nullptr;
    size_t failed = 0;
    {
      py::gil_scoped_release release;
      s = run(reinterpret_cast<const float*>(x.ptr), pos, reinterpret_cast<float*>(out.ptr), &kernel, &failed);
    }
    if (s != Status::ok) {  // only a packed weight's kernel reports an error
      if (s == Status::out_of_memory) throw std::bad_alloc();
      const Weight& w = *all_[failed]->w;
      throw std::runtime_error(std::string("sparseinfer._C.Decoder.step: ") + status_message(s) + " in kernel " +
                               (kernel ? kernel->name : "<none>") + " (isa " + isa_name(isa_) + ") for " + w.desc() +
                               " [" + w.detail + "]");
    }
    return py::reinterpret_borrow<py::object>(out_obj);
  }

  int64_t max_len() const { return max_len_; }

 private:
  static void check_unmoved(const Tensor& t) {
    Tensor now = inspect(t.obj, t.name.c_str());
    if (now.ptr != t.ptr || now.shape != t.shape || now.strides != t.strides || now.dtype != t.dtype)
      value_error("Decoder.step: " + t.name + " was moved or reshaped since the decoder was built");
  }

  static std::vector<float> copy_floats(py::handle obj, const char* name, const std::vector<int64_t>& shape) {
    Tensor t = inspect(obj, name);
    check_dtype(t, {DType::f32});
    check_shape(t, shape, "the model's size");
    check_contiguous(t);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const float* p = data<float>(t);
    return std::vector<float>(p, p + n);
  }

  // Projections side by side: (weight, bias, act, kernel) tuples whose rows add up to `width` (-1: any)
  // and that each take `k` inputs.
  std::vector<Projection> projections(py::handle list, int64_t k, int64_t width, const std::string& what) {
    std::vector<Projection> out;
    int64_t offset = 0;
    for (py::handle item : list) {
      py::tuple t = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
      if (t.size() != 4 && t.size() != 5)
        value_error("Decoder: " + what + ": a projection is (weight, bias, act, kernel[, source])");
      Projection p;
      p.what = what;
      p.owner = py::reinterpret_borrow<py::object>(t[0]);
      if (py::isinstance<Weight>(p.owner)) {
        p.w = &p.owner.cast<Weight&>();
        p.n = p.w->view.N;
        if (p.w->view.K != k)
          value_error("Decoder: " + what + ": " + p.w->desc() + " does not take " + std::to_string(k) + " inputs");
      } else {  // an fp32 matrix
        p.dense = inspect(p.owner, (what + " weight").c_str());
        check_dtype(p.dense, {DType::f32});
        check_dim(p.dense, 2);
        p.n = p.dense.shape[0];
        if (p.n < 1 || p.dense.shape[1] != k)
          value_error("Decoder: " + what + ": a dense weight of shape " + p.dense.shape_str() + " does not take " +
                      std::to_string(k) + " inputs");
        check_contiguous(p.dense);
        if (t.size() == 5 && !t[4].is_none()) {  // the packed weight this matrix is a copy of (made current)
          Weight& source = t[4].cast<Weight&>();
          ensure_current(source);
          if (source.view.N != p.n || source.view.K != k)
            value_error("Decoder: " + what + ": the source " + source.desc() + " does not match the copy " +
                        p.dense.shape_str());
          p.copied_from = source.sources;
        }
      }
      const int64_t n = p.n;
      if (!t[1].is_none()) p.bias = copy_floats(t[1], (what + " bias").c_str(), {n});
      p.act = resolve_act(t[2]);
      if (!t[3].is_none() && !p.w) value_error("Decoder: " + what + ": a dense weight takes no kernel name");
      if (!t[3].is_none()) {
        p.kernel = t[3].cast<std::string>();
        check_named_kernel(p.kernel, *p.w, isa_, p.act, "Decoder: " + what + ": ");
      }
      p.offset = offset;
      offset += n;
      out.push_back(std::move(p));
    }
    if (out.empty() || (width >= 0 && offset != width))
      value_error("Decoder: " + what + ": the projections give " + std::to_string(offset) + " outputs, expected " +
                  std::to_string(width));
    return out;
  }

  // -- the step as stages (threadpool.h: run_stages) ----------------------------------------------------
  // One parallel region per token instead of a fork-join per call: each projection's columns are cut
  // into a few pieces that any thread claims (each claim and finish is a cache line between the cores:
  // ~64K multiply-adds a piece ran 1.1-1.4x slower), attention into KV heads x position ranges
  // (plan_attention); the vector ops between them
  // (norms, rotary, cache writes, residuals, SiLU) and the activation quantization of the projections
  // they feed are one-task stages.
  static constexpr int kPiecesPerThread = 1;

  enum Group { kQkv, kO, kGateUp, kDown, kHead };

  struct StageCtx {
    Decoder* d;
    int64_t layer;  // -1: after the last layer
    int group;      // the projections the stage runs or feeds
  };

  // The projections of (layer, group): a range of all_.
  std::pair<size_t, size_t> group_range(int64_t layer, int group) const {
    if (layer < 0) return {all_.size() - head_.size(), all_.size()};
    const size_t first = first_[size_t(layer)];
    const DecoderLayer& L = layers_[size_t(layer)];
    const size_t q = L.qkv.size(), g = L.gate_up.size();
    switch (group) {
      case kQkv: return {first, first + q};
      case kO: return {first + q, first + q + 1};
      case kGateUp: return {first + q + 1, first + q + 1 + g};
      default: return {first + q + 1 + g, first + q + 2 + g};
    }
  }

  void fail(size_t index, Status s) {
    int32_t ok = int32_t(Status::ok);
    if (status_.compare_exchange_strong(ok, int32_t(s))) failed_ = index;
  }

  void quantize_group(int64_t layer, int group) {
    const auto [b, e] = group_range(layer, group);
    for (size_t i = b; i < e; ++i)
      if (all_[i]->w) calls_[i].quantize();
  }

  // Task i of a projection group's stage: piece i of its projections' columns, in order.
  void run_piece(int64_t layer, int group, int64_t i) {
    const auto [b, e] = group_range(layer, group);
    for (size_t j = b; j < e; ++j) {
      const Projection& p = *all_[j];
      const int64_t rows = piece_rows_[j], pieces = (p.n + rows - 1) / rows;
      if (i >= pieces) {
        i -= pieces;
        continue;
      }
      const int64_t r0 = i * rows, r1 = r0 + rows < p.n ? r0 + rows : p.n;
      if (!p.w) {
        ops_.gemv(reinterpret_cast<const float*>(p.dense.ptr), p.dense.shape[1], inputs_[j],
                  p.bias.empty() ? nullptr : p.bias.data(), r0, r1, outputs_[j] + p.offset);
      } else if (const Status s = calls_[j].columns(r0, r1); s != Status::ok) {
        fail(j, s);
      }
      return;
    }
  }

  int64_t group_pieces(int64_t layer, int group) const {
    const auto [b, e] = group_range(layer, group);
    int64_t n = 0;
    for (size_t j = b; j < e; ++j) n += (all_[j]->n + piece_rows_[j] - 1) / piece_rows_[j];
    return n;
  }

  // The stage list of a step (its shape is fixed by the model; built with the decoder).
  void build_plan() {
    const int64_t n_layers = int64_t(layers_.size());
    ctx_.clear(), plan_.clear(), attention_stages_.clear();
    const auto add = [&](TaskFn fn, int64_t layer, int group, int64_t tasks) {
      ctx_.push_back(StageCtx{this, layer, group});
      plan_.push_back(Stage{fn, nullptr, tasks});  // ctx: below, once ctx_ stops growing
    };
    const TaskFn pieces = [](void* c, int64_t i) {
      const StageCtx& s = *static_cast<StageCtx*>(c);
      s.d->run_piece(s.layer, s.group, i);
    };
    for (int64_t l = 0; l < n_layers; ++l) {
      add([](void* c, int64_t) {  // residual of the previous layer, RMSNorm, q/k/v's activations
        const StageCtx& s = *static_cast<StageCtx*>(c);
        Decoder& D = *s.d;
        if (s.layer > 0) D.ops_.add(D.x_.data(), D.tmp_.data(), D.hidden_);
        const DecoderLayer& L = D.layers_[size_t(s.layer)];
        D.ops_.rms_norm(D.x_.data(), L.norm1.data(), L.eps1, D.hidden_, D.h_.data());
        D.quantize_group(s.layer, kQkv);
      }, l, kQkv, 1);
      add(pieces, l, kQkv, group_pieces(l, kQkv));
      add([](void* c, int64_t) {  // rotary, then the new position's keys and values into the caches
        const StageCtx& s = *static_cast<StageCtx*>(c);
        s.d->rope_and_cache(s.layer);
      }, l, kQkv, 1);
      attention_stages_.push_back(plan_.size());
      add([](void* c, int64_t i) {
        const StageCtx& s = *static_cast<StageCtx*>(c);
        s.d->attend_part(s.layer, i);
      }, l, kO, kv_heads_);  // tasks: set per step (plan_attention)
      add([](void* c, int64_t) {  // the heads from their parts, o's activations (nothing when its kernel takes fp32)
        const StageCtx& s = *static_cast<StageCtx*>(c);
        Decoder& D = *s.d;
        for (int64_t h = 0; h < D.heads_; ++h)
          decode_math::attend_merge(D.part_m_.data() + h, D.part_l_.data() + h, D.part_o_.data() + h * D.head_dim_,
                                    D.parts_, D.heads_, D.head_dim_, D.att_.data() + h * D.head_dim_);
        D.quantize_group(s.layer, kO);
      }, l, kO, 1);
      add(pieces, l, kO, group_pieces(l, kO));
      add([](void* c, int64_t) {  // residual, RMSNorm, gate / up's activations
        const StageCtx& s = *static_cast<StageCtx*>(c);
        Decoder& D = *s.d;
        D.ops_.add(D.x_.data(), D.tmp_.data(), D.hidden_);
        const DecoderLayer& L = D.layers_[size_t(s.layer)];
        D.ops_.rms_norm(D.x_.data(), L.norm2.data(), L.eps2, D.hidden_, D.h_.data());
        D.quantize_group(s.layer, kGateUp);
      }, l, kGateUp, 1);
      add(pieces, l, kGateUp, group_pieces(l, kGateUp));
      add([](void* c, int64_t) {  // SiLU gate, down's activations
        const StageCtx& s = *static_cast<StageCtx*>(c);
        Decoder& D = *s.d;
        D.ops_.silu_mul(D.gate_up_.data(), D.gate_up_.data() + D.intermediate_, D.intermediate_, D.act_.data());
        D.quantize_group(s.layer, kDown);
      }, l, kDown, 1);
      add(pieces, l, kDown, group_pieces(l, kDown));
    }
    add([](void* c, int64_t) {  // the last residual, the final norm (into out without a head)
      const StageCtx& s = *static_cast<StageCtx*>(c);
      Decoder& D = *s.d;
      D.ops_.add(D.x_.data(), D.tmp_.data(), D.hidden_);
      D.ops_.rms_norm(D.x_.data(), D.norm_.data(), D.eps_, D.hidden_, D.head_.empty() ? D.out_ : D.h_.data());
      if (!D.head_.empty()) D.quantize_group(-1, kHead);
    }, -1, kHead, 1);
    add(pieces, -1, kHead, head_.empty() ? 0 : group_pieces(-1, kHead));
    for (size_t k = 0; k < plan_.size(); ++k) plan_[k].ctx = &ctx_[k];
  }

  void rope_and_cache(int64_t l) {
    const int64_t d = head_dim_, kv_width = kv_heads_ * d, q_width = heads_ * d;
    ops_.rope(qkv_.data(), heads_ + kv_heads_, d, cos_.data() + pos_ * d, sin_.data() + pos_ * d);
    for (int64_t g = 0; g < kv_heads_; ++g) {
      const int64_t at = ((l * kv_heads_ + g) * max_len_ + pos_) * d;
      const float* key = qkv_.data() + q_width + g * d;
      const float* value = key + kv_width;
      if (kv_f16_) {  // rounded to nearest even, as torch writes the prompt's rows
        uint16_t* k_cache = reinterpret_cast<uint16_t*>(k_.ptr) + at;
        uint16_t* v_cache = reinterpret_cast<uint16_t*>(v_.ptr) + at;
        for (int64_t i = 0; i < d; ++i) k_cache[i] = f32_to_f16(key[i]), v_cache[i] = f32_to_f16(value[i]);
      } else {
        std::memcpy(reinterpret_cast<float*>(k_.ptr) + at, key, size_t(d) * sizeof(float));
        std::memcpy(reinterpret_cast<float*>(v_.ptr) + at, value, size_t(d) * sizeof(float));
      }
    }
  }

  // Attention over positions 0..pos in parts_ position ranges of part_len_ per KV head: enough tasks
  // for the threads to share (a SmolLM2 step at 4K positions read ~190 MB of K / V, more than its
  // weights), each at least kMinPart positions, so a short context keeps one part per KV head.
  static constexpr int64_t kMaxParts = 16, kMinPart = 256;

  void plan_attention(int64_t len) {
    const int64_t want = (8 * int64_t(threads_) + kv_heads_ - 1) / kv_heads_;
    int64_t parts = (len + kMinPart - 1) / kMinPart;
    parts = parts < want ? parts : want;
    parts = parts < kMaxParts ? parts : kMaxParts;
    part_len_ = ((len + parts - 1) / parts + 15) / 16 * 16;
    parts_ = (len + part_len_ - 1) / part_len_;
    for (size_t k : attention_stages_) plan_[k].tasks = kv_heads_ * parts_;
  }

  // Task i: KV head i / parts_ over its part i % parts_, for the query heads that read it.
  void attend_part(int64_t l, int64_t i) {
    const int64_t d = head_dim_, group = heads_ / kv_heads_, g = i / parts_, p = i % parts_, len = pos_ + 1;
    const int64_t t0 = p * part_len_, t1 = t0 + part_len_ < len ? t0 + part_len_ : len;
    const int64_t rows = (l * kv_heads_ + g) * max_len_ * d, h0 = g * group, at = p * heads_ + h0;
    const float* q = qkv_.data() + h0 * d;
    float* scores = scores_.data() + h0 * max_len_ + t0 * group;
    if (kv_f16_)
      ops_.attend_part_f16(q, group, reinterpret_cast<const uint16_t*>(k_.ptr) + rows,
                           reinterpret_cast<const uint16_t*>(v_.ptr) + rows, d, t0, t1, scale_, scores,
                           part_m_.data() + at, part_l_.data() + at, part_o_.data() + at * d);
    else
      ops_.attend_part(q, group, reinterpret_cast<const float*>(k_.ptr) + rows,
                       reinterpret_cast<const float*>(v_.ptr) + rows, d, t0, t1, scale_, scores,
                       part_m_.data() + at, part_l_.data() + at, part_o_.data() + at * d);
  }

  Status run(const float* x_in, int64_t pos, float* out, const KernelImpl** kernel, size_t* failed) {
    // Kernels and arguments first, on this thread (views_ were copied under the GIL).
    for (size_t i = all_.size() - head_.size(); i < all_.size(); ++i) outputs_[i] = out;
    for (size_t i = 0; i < all_.size(); ++i) {
      const Projection& p = *all_[i];
      if (!p.w) continue;
      LinearCall call{};
      call.x = inputs_[i], call.x_dtype = DType::f32, call.stride_xm = views_[i].K;
      call.y = outputs_[i] + p.offset, call.stride_ym = views_[i].N, call.M = 1;
      call.bias = p.bias.empty() ? nullptr : p.bias.data(), call.bias_dtype = DType::f32;
      call.act = p.act;
      call.kernel = p.kernel.empty() ? nullptr : p.kernel.c_str();
      const Status s = prepare_row_call(call, views_[i], isa_, &calls_[i]);
      *kernel = calls_[i].kernel;
      if (s != Status::ok) {
        *failed = i;
        return s;
      }
    }
    pos_ = pos, out_ = out;
    plan_attention(pos + 1);
    std::memcpy(x_.data(), x_in, size_t(hidden_) * sizeof(float));
    status_.store(int32_t(Status::ok));
    run_stages(plan_.data(), int64_t(plan_.size()), threads_);
    if (status_.load() != int32_t(Status::ok)) {
      *failed = failed_;
      *kernel = calls_[failed_].kernel;
    }
    return Status(status_.load());
  }

  int64_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, intermediate_ = 0, max_len_ = 0, vocab_ = 0;
  float scale_ = 1, eps_ = 0;
  int threads_ = 1;
  Isa isa_ = Isa::scalar;
  DecodeOps ops_{};
  Tensor k_, v_;
  bool kv_f16_ = false;  // a half-precision cache (IEEE fp16)
  std::vector<float> cos_, sin_, norm_;
  std::vector<DecoderLayer> layers_;
  std::vector<Projection> head_;  // empty or one
  std::vector<Projection*> all_;  // every projection in the order a step runs them
  std::vector<WeightView> views_;  // their views for this step, copied under the GIL
  std::vector<std::shared_ptr<Derived>> holds_;  // and the derived buffers the views point into
  std::vector<float> x_, h_, tmp_, qkv_, att_, gate_up_, act_, scores_;
  // attention parts of a step: m, l [part][head], o [part][head][d] (decode.h, attend_part)
  std::vector<float> part_m_, part_l_, part_o_;
  int64_t parts_ = 1, part_len_ = 1;
  std::vector<size_t> attention_stages_;  // plan_ indices of the attention stages
  // the stages of a step and, per projection (all_'s order): its input, output, rows per piece and call
  std::vector<size_t> first_;  // each layer's first projection in all_
  std::vector<const float*> inputs_;
  std::vector<float*> outputs_;
  std::vector<int64_t> piece_rows_;
  std::vector<RowCall> calls_;
  std::vector<StageCtx> ctx_;
  std::vector<Stage> plan_;
  int64_t pos_ = 0;
  float* out_ = nullptr;
  std::atomic<int32_t> status_{int32_t(Status::ok)};
  size_t failed_ = 0;
};

py::list names(const std::vector<Isa>& isas) {
  py::list out;
  for (Isa i : isas) out.append(py::str(isa_name(i)));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseinfer C++ CPU kernels (see csrc/README.md). Private: use sparseinfer.backends.cpu.";

  py::class_<Weight>(m, "Weight", "A packed weight validated and viewed for the CPU kernels (from pack_*).")
      .def_property_readonly("fmt", [](const Weight& w) { return w.fmt; })
      .def_property_readonly("shape", [](const Weight& w) { return py::make_tuple(w.view.N, w.view.K); })
      .def_property_readonly("kernel_family", [](const Weight& w) { return kernel_id_name(w.view.id); })
      .def_property_readonly("tile_bytes", [](const Weight& w) { return w.derived->bytes; },
                             "Bytes of the layouts derived from the canonical tensors at first use (the row tiles of "
                             "int8 activations: 0 until the first such call, and again after a rebuild).")
      .def_property_readonly("current", [](const Weight& w) { return sources_current(w); },
                             "Whether the source tensors are where, and as written, as when the view was built "
                             "(else the next call rebuilds it).")
      .def("__repr__", [](const Weight& w) {
        return "<sparseinfer._C.Weight " + w.fmt + " (" + std::to_string(w.view.N) + ", " + std::to_string(w.view.K) +
               ") " + w.detail + ">";
      });

  py::class_<Decoder>(m, "Decoder",
                      "A causal LM's batch-1 decode step in one call, every projection a packed kernel or an fp32 "
                      "matrix (sparseinfer/lean_llama.py builds it).")
      .def(py::init<py::tuple, py::handle, py::handle, py::handle, py::handle, py::list, py::handle, double, py::object,
                    int64_t, const py::object&>(),
           py::arg("dims"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("layers"),
           py::arg("norm"), py::arg("eps"), py::arg("head") = py::none(), py::arg("num_threads") = 1,
           py::arg("isa") = py::none(),
           "dims (hidden, heads, kv_heads, head_dim, intermediate, attention scale); cos / sin float32 [max_len, "
           "head_dim] (sin with rotate_half's sign in its first half); k_cache / v_cache float32 [layers, kv_heads, "
           "max_len, head_dim], contiguous; layers: (norm1, eps1, qkv, o, norm2, eps2, gate_up, down) where qkv and "
           "gate_up are lists of projections side by side and a projection is (Weight, bias or None, act, kernel "
           "or None), or (float32 matrix, bias or None, act, None[, the Weight it is a copy of]); norm / eps: the "
           "final RMSNorm; head: a projection or None.")
      .def("step", &Decoder::step, py::arg("x"), py::arg("pos"), py::arg("out"),
           "x float32 [hidden] at position pos (the caches hold positions 0..pos-1) -> out: the logits [vocab] "
           "with a head, else the final norm's output [hidden]. Writes position pos of the caches. Returns out.")
      .def_property_readonly("max_len", &Decoder::max_len);

  m.def("pack_int8", &pack_int8, py::arg("qweight"), py::arg("scale"), py::arg("k"),
        "int8: qweight int8 [N, Kp], scale float32 [N, G] (G divides Kp), true K <= Kp.");
  m.def("pack_int4", &pack_int4, py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("k"),
        "int4: qweight uint8 [N, Kp/2] (low nibble = even k), scale float32 [N, G], zero uint8 [N, G] or None "
        "(symmetric, zero 8), true K <= Kp.");
  m.def("pack_nm", &pack_nm, py::arg("meta"), py::arg("n"), py::arg("m"), py::arg("k"), py::arg("values"),
        "N:M: meta uint8 [N, ceil(Kc*b/8)], values float [N, Kc] or a Weight from pack_int8 / pack_int4 of shape "
        "(N, Kc), Kc = ceil(K/m)*n, b = ceil(log2 m).");
  m.def("pack_csr", &pack_csr, py::arg("crow"), py::arg("col"), py::arg("values"), py::arg("scale"), py::arg("k"),
        "CSR: crow int64 [N+1], col int32 [nnz] in [0, K) and strictly increasing within each row, values float [nnz] "
        "or int8 [nnz] with scale float32 [N].");
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("bias") = py::none(),
        py::arg("num_threads") = 1, py::arg("isa") = py::none(), py::arg("act") = py::none(),
        py::arg("kernel") = py::none(),
        "out[M, N] = x[M, K] @ W^T + bias. x float32 / bfloat16 / float16 with unit stride along K (any row "
        "stride); out preallocated, x's dtype, unit stride along N; bias [N] float or None. Runs on the active "
        "ISA unless isa names another available one. act: 'fp32' (exact), 'int8' (int8 / int4 weights: x may be "
        "quantized per call, integer dot products; see csrc/README.md) or 'auto' (= None: int8 activations where "
        "the table's first matching row takes them). kernel: run the kernel of this name (one of "
        "kernel_candidates, or any row of the weight's family this CPU and act allow) instead of the table's pick. "
        "Returns out.");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("mask") = py::none(), py::arg("scale") = 1.0, py::arg("causal") = false, py::arg("num_threads") = 1,
        py::arg("isa") = py::none(),
        "out[B, Lq, H, D] (float32, contiguous) = softmax(scale * q k^T) v per head, q [B, H, Lq, D], k and v "
        "[B, Hkv, Lk, D] float32 with unit stride along D (H a multiple of Hkv: grouped-query heads). mask: uint8 "
        "(B or 1, 1, Lq or 1, Lk), any strides (a bool mask viewed as uint8), nonzero where a key may be seen, "
        "or None; causal: row i also sees only keys j <= i. A row that may see no key gets zeros. Returns False "
        "(out untouched) when the mask shows different keys to different rows, the only masks it does not take; "
        "else True. Runs on the active ISA unless isa names another available one.");
  m.def("dequantize", &dequantize, py::arg("weight"), py::arg("row_begin"), py::arg("row_end"), py::arg("out"),
        py::arg("num_threads") = 1,
        "out[row_end - row_begin, K] (float32, contiguous) = rows row_begin:row_end of the weight dequantized: "
        "exactly to_dense()'s values. Returns out.");
  m.def("threading", [] { return std::string(threading_name()); },
        "Which threads split a call: the host's OpenMP team (torch's, when loaded) or sparseinfer's own pool.");
  m.def("kernel_table", [](const py::object& isa_obj) {
        py::list rows;
        for (const KernelRow& r : kernel_rows(resolve_isa(isa_obj))) {
          py::dict d;
          d["name"] = r.impl->name, d["family"] = kernel_id_name(r.impl->id), d["isa"] = isa_name(r.isa);
          d["max_m"] = r.max_m, d["builtin_max_m"] = r.impl->max_m;
          d["int8_act"] = bool(r.impl->requires & kCallInt8Act);
          d["measured_only"] = bool(r.impl->requires & kMeasuredOnly);
          rows.append(d);
        }
        return rows;
      }, py::arg("isa") = py::none(),
      "The kernel rows a call on `isa` tries, in order: name, family, isa, max_m (in force), builtin_max_m, "
      "int8_act (needs act='auto' or 'int8'), measured_only (never the table's pick: a call must name it).");
  m.def("set_batch_limit", [](const std::string& name, int64_t max_m) {
        if (!set_batch_limit(name, max_m)) value_error("set_batch_limit: no kernel named '" + name + "'");
      }, py::arg("name"), py::arg("max_m"),
      "Replace a kernel row's batch limit (calls with M <= max_m may run it); max_m < 0 restores the built-in one.");
  m.def("kernel_name", &kernel_name, py::arg("weight"), py::arg("batch"), py::arg("isa") = py::none(),
        py::arg("act") = py::none(), "The kernel a call with `batch` rows (and activation mode act) would run.");
  m.def("kernel_candidates", &kernel_candidate_names, py::arg("weight"), py::arg("batch"), py::arg("isa") = py::none(),
        py::arg("act") = py::none(),
        "The kernels a call with `batch` rows may run by name: kernel_name's pick first, then the measured-only "
        "rows that admit the batch (sparseinfer's measured routes time them against each other).");
  m.def("act_modes", [] {
        py::tuple t(act_mode_names().size());
        for (size_t i = 0; i < act_mode_names().size(); ++i) t[i] = act_mode_names()[i];
        return t;
      },
        "The activation modes `act` accepts (the same set as sparseinfer.act.ACT_MODES).");
  m.def("available_isas", [] { return names(available_isas()); },
        "ISAs this build has kernels for and this CPU runs, scalar first.");
  m.def("compiled_isas", [] { return names(compiled_isas()); }, "ISA groups compiled into this build.");
  m.def("active_isa", [] { return isa_name(resolve_isa(py::none())); },
        "The ISA calls use by default: the best available, or SPARSEINFER_ISA. Raises ValueError if "
        "SPARSEINFER_ISA names an unknown or unavailable ISA.");
  m.def("cpu_features", [] {
        py::dict d;
        d["arch"] = cpu_arch();
        for (const auto& f : cpu_feature_list()) d[py::str(f.first)] = f.second;
        return d;
      },
      "Detected CPU features relevant to dispatch, with the architecture under 'arch'.");
}
