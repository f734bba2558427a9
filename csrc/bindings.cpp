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

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

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

void check_shape(const Tensor& t, const std::vector<int64_t>& want, const std::string& why) {
  if (t.shape != want) {
    Tensor w;
    w.shape = want;
    value_error(t.name + " must have shape " + w.shape_str() + " (" + why + "), got " + t.shape_str());
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

bool sources_current(const Weight& w) {
  const TorchTypes& T = torch_types();
  for (const Source& s : w.sources) {
    int64_t ptr = 0, version = -1;
    if (!read_int(s.tensor.ptr(), T.data_ptr.ptr(), true, &ptr) || uintptr_t(ptr) != s.ptr) return false;
    if (s.version >= 0 && (!read_int(s.tensor.ptr(), T.version.ptr(), false, &version) || version != s.version))
      return false;
  }
  return true;
}

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
  } else if ((id == KernelId::nm_int8 || id == KernelId::nm_int4) && !w.view.nm.q8.codes) {
    const size_t bytes = nm_q8_prepack_bytes(w.view);
    if (bytes) w.view.nm.q8 = nm_q8_prepack(w.view, alloc_derived(w, bytes));  // 0: a layout only exact kernels take
  } else if ((id == KernelId::int8 || id == KernelId::int4) && !w.view.qt.codes) {
    const int bits = id == KernelId::int8 ? 8 : 4;
    w.view.qt = build_qtiles(w.view.q, w.view.N, bits, alloc_derived(w, qtile_bytes(w.view.q, w.view.N, bits)));
  }
}

// kReadsQTiles for selection: the weight has row tiles, or (N:M) can have them built on first use.
uint64_t tile_bits(const Weight& w) {
  const KernelId id = w.view.id;
  const bool nm = id == KernelId::nm_int8 || id == KernelId::nm_int4;
  return w.view.qt.codes || (nm && nm_qtiles_supported(w.view)) ? uint64_t(kReadsQTiles) : 0;
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
  check_shape(out, want, "x's leading dims and N for x " + x.shape_str() + " and " + w.desc());
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
    check_shape(bias, {N}, "one per output feature of " + w.desc());
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
    const uint64_t bits = act_call_bits(call.act);
    if (!find_kernel(named.c_str(), w.view.id, isa, bits ? bits | tile_bits(w) : 0))
      value_error("kernel '" + named + "' cannot run " + w.desc() + " on isa " + isa_name(isa) + " with act='" +
                  act_mode_name(call.act) + "' (kernel_candidates lists those that can)");
    call.kernel = named.c_str();
  }
  ensure_current(w);  // after every other Python call: nothing runs between this and the kernel
  if (const uint64_t bits = act_call_bits(call.act)) {  // build the int8-activation layout only if it runs
    const uint64_t sel = bits | tile_bits(w);
    const KernelImpl* k = call.kernel ? find_kernel(call.kernel, w.view.id, isa, sel) : select_kernel(w.view.id, isa, M, sel);
    if (k && (k->requires & kCallInt8Act)) ensure_qtiles(w, *k);
  }

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
