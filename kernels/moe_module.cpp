// pybind11 bindings of one ISA variant: moetier.backends.native._moe_<variant>.
//
// The Python side hands numpy views of torch tensors (bf16 as uint16, fp8 as uint8); nothing here links
// against libtorch. Every size is checked before a pointer is touched, and compute runs with the GIL
// released so a forward overlaps with Python (and GPU) work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "amx_permission.h"
#include "decode_attention.h"
#include "dense_linear.h"
#include "host_tasks.h"
#include "moe_layer.h"
#include "rms_norm.h"
#include "rotary.h"

namespace py = pybind11;

namespace moetier_kernels {
inline namespace MOETIER_NS {
namespace {

MatFormat parse_format(const std::string& name) {
    if (name == "fp32") return {F32, 0};
    if (name == "fp16") return {F16, 0};
    if (name == "bf16") return {BF16, 0};
    if (name == "int8") return {I8, 0};
    if (name == "fp8_e4m3") return {FP8, 0};
    if (name == "int4_g32") return {I4, 32};
    if (name == "int4_g64") return {I4, 64};
    if (name == "int4_g128") return {I4, 128};
    // Layouts of GGUF's block formats, which the Python side decodes into codes and the file's scales:
    // int8 / int4 with its fp16 scale per 32 (q8_0 / q4_0); the K-quants' two levels (fp16 d / dmin per
    // 256 with 6-bit sc / m per 32 over unsigned 4- / 5-bit codes for q4_k / q5_k; q6_k: fp16 d per 256,
    // int8 sc per 16 over 6-bit codes), the 5- and 6-bit codes split into nibbles and top bits.
    if (name == "int8_g32_f16") return {I8, 32, false, SCALE_F16};
    if (name == "int4_g32_f16") return {I4, 32, false, SCALE_F16};
    // q4_1 / q5_1: fp16 d and m per 32 over unsigned 4- / 5-bit codes (m kept as the min -m); q5_0: fp16 d
    // per 32 over 5-bit codes q + 16
    if (name == "int4_g32_f16_mins") return {I4, 32, true, SCALE_F16};
    if (name == "int5_g32_f16") return {I8, 32, false, SCALE_F16, 1};
    if (name == "int5_g32_f16_mins") return {I8, 32, true, SCALE_F16, 1};
    // iq4_nl / iq4_xs: 4-bit indices into IQ4's grid with fp16 d per 32, or d per 256 and ls - 32 per 32
    if (name == "iq4_g32_f16") return {I4, 32, false, SCALE_F16, 0, true};
    if (name == "iq4_g32_kscales") return {I4, 32, false, SCALE_K, 0, true};
    if (name == "int5_g32_kscales") return {I8, 32, true, SCALE_K, 1};
    if (name == "int4_g32_kscales") return {I4, 32, true, SCALE_K};
    if (name == "int6_g16_kscales") return {I8, 16, false, SCALE_K, 2};
    // q2_k: fp16 d and dmin per 256, 4-bit sc and m per 16 over 2-bit codes; q3_k: fp16 d per 256, sc - 32
    // per 16 over 3-bit codes (2-bit code lines plus third bits)
    if (name == "int2_g16_kscales") return {I8, 16, true, SCALE_K, 0, false, true};
    if (name == "int3_g16_kscales") return {I8, 16, false, SCALE_K, 1, false, true};
    // MXFP4: the e2m1 codes and e8m0 scales as they ship
    if (name == "mxfp4") return {I4, 32, false, SCALE_E8M0};
    throw py::value_error("native kernels do not compute format '" + name + "'");
}

const uint8_t* bytes_of(const py::array& a, int64_t want, const char* what) {
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
    if (int64_t(a.nbytes()) != want)
        throw py::value_error(std::string(what) + ": expected " + std::to_string(want) + " bytes, got " +
                              std::to_string(a.nbytes()));
    return static_cast<const uint8_t*>(a.data());
}

const float* floats_of(const py::object& o, int64_t want, const char* what) {
    if (want == 0) {
        if (!o.is_none()) throw py::value_error(std::string(what) + ": this format takes no scales");
        return nullptr;
    }
    if (o.is_none()) throw py::value_error(std::string(what) + ": scales are required");
    py::array a = py::reinterpret_borrow<py::array>(o);
    if (!a.dtype().is(py::dtype::of<float>())) throw py::type_error(std::string(what) + " must be float32");
    return reinterpret_cast<const float*>(bytes_of(a, want * 4, what));
}

const float* optional_floats(const py::object& o, int64_t n, const char* what) {
    if (o.is_none()) return nullptr;
    return floats_of(o, n, what);
}

#if MOETIER_HAS_AMX && !defined(MOETIER_AMX_EMULATOR)
// Without the tile data state the first tile instruction raises SIGILL. The loader only imports this
// variant where hardware detection's request succeeded, but asking again is cheap and makes the module
// safe on its own.
void require_amx_permission() {
    if (moetier_os::request_amx_permission() != 0)
        throw py::import_error("the OS refused AMX tile state to this process (arch_prctl ARCH_REQ_XCOMP_PERM); "
                               "use a lower kernel variant");
}
#endif

int activation_code(const std::string& a) {
    if (a == "silu") return SILU;
    if (a == "swiglu_oai") return SWIGLU_OAI;
    throw py::value_error("unknown activation '" + a + "'");
}

}  // namespace
}  // namespace MOETIER_NS
}  // namespace moetier_kernels

using namespace moetier_kernels;

namespace {
// hidden [T, H] (fp32, or bf16 bits as uint16), ids [T, k] int64, weights [T, k] fp32, out [T, H]: the
// checks of MoELayer.forward, shared by the host tasks (which keep the pointers for later runs).
struct ForwardArrays {
    const void* hidden;
    int T, K;
    const int64_t* ids;
    const float* weights;
    void* out;
    size_t out_bytes;
};

ForwardArrays check_forward_arrays(const MoELayer& L, py::array& hidden, bool hidden_bf16, py::array& ids,
                                   py::array& weights, py::array& out, bool out_bf16) {
    const int H = L.down_geometry().N;
    if (hidden.ndim() != 2 || hidden.shape(1) != H) throw py::value_error("hidden must be [T, hidden]");
    const int T = int(hidden.shape(0));
    if (ids.ndim() != 2 || ids.shape(0) != T || ids.shape(1) < 1) throw py::value_error("topk_ids must be [T, k]");
    const int K = int(ids.shape(1));
    if (!ids.dtype().is(py::dtype::of<int64_t>())) throw py::type_error("topk_ids must be int64");
    if (!weights.dtype().is(py::dtype::of<float>())) throw py::type_error("topk_weights must be float32");
    if (hidden_bf16 ? hidden.itemsize() != 2 : !hidden.dtype().is(py::dtype::of<float>()))
        throw py::type_error("hidden must be float32 or bf16 bits (uint16)");
    if (out_bf16 ? out.itemsize() != 2 : !out.dtype().is(py::dtype::of<float>()))
        throw py::type_error("out must be float32 or bf16 bits (uint16)");
    if (!out.writeable()) throw py::value_error("out must be writable");
    ForwardArrays a;
    a.T = T;
    a.K = K;
    a.hidden = bytes_of(hidden, int64_t(T) * H * (hidden_bf16 ? 2 : 4), "hidden");
    a.ids = reinterpret_cast<const int64_t*>(bytes_of(ids, int64_t(T) * K * 8, "topk_ids"));
    a.weights = reinterpret_cast<const float*>(bytes_of(weights, int64_t(T) * K * 4, "topk_weights"));
    a.out_bytes = size_t(T) * H * (out_bf16 ? 2 : 4);
    bytes_of(out, int64_t(a.out_bytes), "out");
    a.out = out.mutable_data();
    return a;
}

// The value checks of a forward, before any work: every expert id in [0, E) and, with check_finite, no
// NaN or Inf in hidden or the weights (an exponent of all ones). Returns None, or (what, bad id) for the
// caller's typed error. One pass over each array: a decode call's are a few kilobytes.
py::object value_problem(const ForwardArrays& a, int H, bool hidden_bf16, int num_experts, bool check_finite) {
    const int64_t n_ids = int64_t(a.T) * a.K;
    if (n_ids) {
        int64_t lo = a.ids[0], hi = a.ids[0];
        for (int64_t i = 1; i < n_ids; ++i) {
            lo = std::min(lo, a.ids[i]);
            hi = std::max(hi, a.ids[i]);
        }
        if (lo < 0 || hi >= num_experts) return py::make_tuple("expert_id", lo < 0 ? lo : hi);
    }
    if (!check_finite) return py::none();
    const int64_t n = int64_t(a.T) * H;
    bool bad = false;
    if (hidden_bf16) {
        const uint16_t* h = static_cast<const uint16_t*>(a.hidden);
        for (int64_t i = 0; i < n; ++i) bad |= (h[i] & 0x7f80) == 0x7f80;
    } else {
        const uint32_t* h = static_cast<const uint32_t*>(a.hidden);
        for (int64_t i = 0; i < n; ++i) bad |= (h[i] & 0x7f800000u) == 0x7f800000u;
    }
    if (bad) return py::make_tuple("hidden", 0);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a.weights);
    for (int64_t i = 0; i < n_ids; ++i) bad |= (w[i] & 0x7f800000u) == 0x7f800000u;
    if (bad) return py::make_tuple("topk_weights", 0);
    return py::none();
}

// x [T, K] of a dense matrix (fp32, or bf16 bits as uint16): its data, and T.
const void* dense_input(py::array& x, int64_t K, bool x_bf16, int& T) {
    if (x.ndim() != 2 || x.shape(1) != K) throw py::value_error("x must be [T, in_features]");
    T = int(x.shape(0));
    if (x_bf16 ? x.itemsize() != 2 : !x.dtype().is(py::dtype::of<float>()))
        throw py::type_error("x must be float32 or bf16 bits (uint16)");
    return bytes_of(x, int64_t(T) * K * (x_bf16 ? 2 : 4), "x");
}

// out [T, N] of packed matrix d (fp32, or bf16 bits): its writable data.
void* dense_output(const DenseLinear& d, py::array& out, int T, bool out_bf16) {
    const int64_t N = d.geometry().N;
    if (!d.packed()) throw py::value_error("the matrix is not packed");
    if (out.ndim() != 2 || out.shape(0) != T || out.shape(1) != N)
        throw py::value_error("out must be [T, out_features]");
    if (out_bf16 ? out.itemsize() != 2 : !out.dtype().is(py::dtype::of<float>()))
        throw py::type_error("out must be float32 or bf16 bits (uint16)");
    if (!out.writeable()) throw py::value_error("out must be writable");
    bytes_of(out, int64_t(T) * N * (out_bf16 ? 2 : 4), "out");
    return out.mutable_data();
}

// The byte strides of the first three dimensions of a 4-d array whose last dimension is contiguous (any
// strides before it, 0 to broadcast).
void outer_strides(const py::array& a, const char* what, int64_t& s0, int64_t& s1, int64_t& s2) {
    if (a.ndim() != 4) throw py::value_error(std::string(what) + " must have 4 dimensions");
    for (int i = 0; i < 4; ++i)
        if (a.strides(i) < 0) throw py::value_error(std::string(what) + " must not have negative strides");
    if (a.shape(3) > 1 && a.strides(3) != a.itemsize())
        throw py::value_error(std::string(what) + ": its last dimension must be contiguous");
    s0 = a.strides(0);
    s1 = a.strides(1);
    s2 = a.strides(2);
}

void check_element(const py::array& a, bool bf16, const char* what) {
    if (bf16 ? a.itemsize() != 2 : !a.dtype().is(py::dtype::of<float>()))
        throw py::type_error(std::string(what) + " must be float32 or bf16 bits (uint16)");
}
}  // namespace

PYBIND11_MODULE(MOETIER_MODULE, m) {
    m.doc() = "moetier native MoE expert kernels, ISA variant " MOETIER_VARIANT;
    m.attr("VARIANT") = MOETIER_VARIANT;
    m.attr("HAS_DOT_KERNELS") = bool(MOETIER_HAS_DOT);
    m.attr("DECODE_MAX_TOKENS") = DECODE_MAX_TOKENS;
    m.attr("HAS_AMX_TILES") = bool(MOETIER_HAS_AMX);
#if MOETIER_HAS_AMX && !defined(MOETIER_AMX_EMULATOR)
    require_amx_permission();
#endif
#if defined(MOETIER_AMX_EMULATOR)
    m.def("emulated_tile_dots", &amx::emulated_dot_count, "tdp instructions the software tile unit has run");
#endif

    py::class_<ThreadPool>(m, "ThreadPool", py::module_local())
        .def(py::init<int, std::vector<int>, std::vector<int>>(), py::arg("threads"), py::arg("cpus"),
             py::arg("nodes"))
        .def_property_readonly("size", &ThreadPool::size)
        .def_property_readonly("num_nodes", &ThreadPool::num_nodes)
        .def_property_readonly("pinned", &ThreadPool::pinned_count)
        .def_property("idle_spin_us", &ThreadPool::idle_spin_us, &ThreadPool::set_idle_spin_us,
                      "microseconds an idle worker spins before parking (waking a parked one costs a futex "
                      "round trip per call)");

    py::class_<MoELayer>(m, "MoELayer", py::module_local())
        .def(py::init([](int num_experts, int hidden, int intermediate, const std::string& fmt,
                         const std::string& activation, float alpha, float limit, bool has_bias,
                         bool int8_activations, bool fp8_vbmi, const std::optional<std::string>& down_fmt,
                         int capacity) {
                 if (capacity < 0) throw std::invalid_argument("capacity must be >= 0 (0: every expert)");
                 const MatFormat f = parse_format(fmt);
                 const MatFormat d = down_fmt ? parse_format(*down_fmt) : f;
                 return new MoELayer(num_experts, hidden, intermediate, f, d, activation_code(activation), alpha, limit,
                                     has_bias, int8_activations, fp8_vbmi, capacity);
             }),
             py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("fmt"),
             py::arg("activation") = "silu", py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f,
             py::arg("has_bias") = false, py::arg("int8_activations") = true, py::arg("fp8_vbmi") = true,
             py::arg("down_fmt") = py::none(), py::arg("capacity") = 0,
             "fmt: the gate/up matrices' packed layout; down_fmt: the down matrix's (None: the same); capacity: "
             "how many experts will be packed (0: all), which sizes the memory mapped for them")
        .def_property_readonly("expert_bytes", &MoELayer::expert_bytes, "packed bytes of one expert")
        .def_property_readonly("num_slots", &MoELayer::num_slots)
        .def_property_readonly("int8_activations", &MoELayer::int8_activations)
        .def_property_readonly("fp8_vbmi", &MoELayer::fp8_vbmi, "fp8 runs on the VBMI kernels (build and CPU allow)")
        .def(
            "add_expert",
            [](MoELayer& L, int id, py::array gate, py::object gate_scales, py::array up, py::object up_scales,
               py::array down, py::object down_scales, py::object gate_bias, py::object up_bias,
               py::object down_bias, int node, int num_nodes) {
                const Geometry& gu = L.gate_up_geometry();
                const Geometry& dn = L.down_geometry();
                const uint8_t* g = bytes_of(gate, gu.src_data_bytes(), "gate");
                const uint8_t* u = bytes_of(up, gu.src_data_bytes(), "up");
                const uint8_t* d = bytes_of(down, dn.src_data_bytes(), "down");
                const float* gs = floats_of(gate_scales, gu.src_scale_count(), "gate scales");
                const float* us = floats_of(up_scales, gu.src_scale_count(), "up scales");
                const float* ds = floats_of(down_scales, dn.src_scale_count(), "down scales");
                const float* bg = optional_floats(gate_bias, gu.N, "gate bias");
                const float* bu = optional_floats(up_bias, gu.N, "up bias");
                const float* bd = optional_floats(down_bias, dn.N, "down bias");
                py::gil_scoped_release release;
                L.add_expert(id, g, gs, u, us, d, ds, bg, bu, bd, node, num_nodes);
            },
            py::arg("expert_id"), py::arg("gate"), py::arg("gate_scales"), py::arg("up"), py::arg("up_scales"),
            py::arg("down"), py::arg("down_scales"), py::arg("gate_bias") = py::none(),
            py::arg("up_bias") = py::none(), py::arg("down_bias") = py::none(), py::arg("node") = 0,
            py::arg("num_nodes") = 1)
        .def(
            "forward",
            [](const MoELayer& L, ThreadPool& pool, py::array hidden, bool hidden_bf16, py::array ids,
               py::array weights, py::array out, bool out_bf16, bool check_finite) -> py::object {
                const ForwardArrays a = check_forward_arrays(L, hidden, hidden_bf16, ids, weights, out, out_bf16);
                py::object problem = value_problem(a, L.down_geometry().N, hidden_bf16, L.num_experts(), check_finite);
                if (!problem.is_none() || a.T == 0) return problem;
                py::gil_scoped_release release;
                L.forward(pool, a.hidden, hidden_bf16, a.T, a.K, a.ids, a.weights, a.out, out_bf16);
                return py::none();
            },
            py::arg("pool"), py::arg("hidden"), py::arg("hidden_bf16"), py::arg("topk_ids"), py::arg("topk_weights"),
            py::arg("out"), py::arg("out_bf16"), py::arg("check_finite") = false,
            "None, or (what, bad expert id) when an input is bad (nothing computed, out untouched): an expert "
            "id out of range, or with check_finite NaN/Inf in hidden or topk_weights");

    py::class_<DenseLinear>(m, "DenseLinear", py::module_local(),
                            "one dense matrix W [out, in] in the packed layout: y = x W^T + b on the experts' kernels")
        .def(py::init([](int out_features, int in_features, const std::string& fmt, bool has_bias,
                         bool int8_activations, bool fp8_vbmi, int groups) {
                 return new DenseLinear(out_features, in_features, parse_format(fmt), has_bias, int8_activations,
                                        fp8_vbmi, groups);
             }),
             py::arg("out_features"), py::arg("in_features"), py::arg("fmt"), py::arg("has_bias") = false,
             py::arg("int8_activations") = true, py::arg("fp8_vbmi") = true, py::arg("groups") = 1,
             "groups > 1: block-diagonal, rows [g N/G, (g+1) N/G) times x's columns [g K, (g+1) K)")
        .def_property_readonly("nbytes", &DenseLinear::bytes, "packed bytes (panels padded to 16 rows, scales)")
        .def_property_readonly("out_features", [](const DenseLinear& d) { return d.geometry().N; })
        .def_property_readonly("in_features", [](const DenseLinear& d) { return d.geometry().K; })
        .def_property_readonly("groups", &DenseLinear::groups)
        .def_property_readonly("fp8_vbmi", &DenseLinear::fp8_vbmi)
        .def(
            "pack",
            [](DenseLinear& d, py::array data, py::object scales, py::object bias) {
                const Geometry& g = d.geometry();
                if (d.packed()) throw py::value_error("the matrix is already packed");
                const uint8_t* w = bytes_of(data, g.src_data_bytes(), "weight");
                const float* s = floats_of(scales, g.src_scale_count(), "weight scales");
                const float* b = optional_floats(bias, g.N, "bias");
                py::gil_scoped_release release;
                d.pack(w, s, b);
            },
            py::arg("data"), py::arg("scales"), py::arg("bias") = py::none())
        .def(
            "forward",
            [](const DenseLinear& d, ThreadPool& pool, py::array x, bool x_bf16, py::array out, bool out_bf16) {
                int T = 0;
                const void* xp = dense_input(x, d.in_width(), x_bf16, T);
                void* op = dense_output(d, out, T, out_bf16);
                if (T == 0) return;
                py::gil_scoped_release release;
                d.forward(pool, xp, x_bf16, T, op, out_bf16);
            },
            py::arg("pool"), py::arg("x"), py::arg("x_bf16"), py::arg("out"), py::arg("out_bf16"));

    m.def(
        "dense_forward_many",
        [](ThreadPool& pool, const std::vector<const DenseLinear*>& mats, py::array x, bool x_bf16,
           std::vector<py::array> outs, bool out_bf16) {
            if (mats.empty() || mats.size() != outs.size())
                throw py::value_error("give one out array per matrix (and at least one matrix)");
            int T = 0;
            const void* xp = dense_input(x, mats[0]->geometry().K, x_bf16, T);
            std::vector<void*> ptrs;
            for (size_t i = 0; i < mats.size(); ++i) {
                if (!mats[i]) throw py::value_error("every matrix must be a DenseLinear");
                if (!mats[0]->shares_input(*mats[i], T))
                    throw py::value_error("the matrices differ in input width, format or kernel path");
                ptrs.push_back(dense_output(*mats[i], outs[i], T, out_bf16));
            }
            if (T == 0) return;
            py::gil_scoped_release release;
            DenseLinear::forward_many(pool, int(mats.size()), mats.data(), xp, x_bf16, T, ptrs.data(), out_bf16);
        },
        py::arg("pool"), py::arg("mats"), py::arg("x"), py::arg("x_bf16"), py::arg("outs"), py::arg("out_bf16"),
        "every matrix on the same x in one call (one input conversion and one pool dispatch): a layer's q, k, v");

    // ---- RMSNorm over rows (rms_norm.h) --------------------------------------------------------------------
    m.def(
        "rms_norm",
        [](ThreadPool& pool, py::array x, py::array weight, py::array out, bool bf16, float eps) {
            check_element(x, bf16, "x");
            check_element(weight, bf16, "weight");
            check_element(out, bf16, "out");
            if (x.ndim() != 2 || out.ndim() != 2 || weight.ndim() != 1)
                throw py::value_error("x and out must be [rows, D], weight [D]");
            const int64_t rows = x.shape(0), D = x.shape(1);
            if (weight.shape(0) != D || out.shape(0) != rows || out.shape(1) != D)
                throw py::value_error("x, weight and out must have the same D, x and out the same rows");
            const int64_t item = bf16 ? 2 : 4;
            if ((D > 1 && (x.strides(1) != item || out.strides(1) != item)) || x.strides(0) < 0 || out.strides(0) < 0 ||
                (D > 1 && weight.strides(0) != item))
                throw py::value_error("rows of x, out and weight must be contiguous");
            if (!out.writeable()) throw py::value_error("out must be writable");
            RmsNormArgs a;
            a.x = static_cast<const uint8_t*>(x.data());
            a.x_stride = x.strides(0);
            a.w = weight.data();
            a.out = static_cast<uint8_t*>(out.mutable_data());
            a.out_stride = out.strides(0);
            a.rows = rows;
            a.D = int(D);
            a.bf16 = bf16;
            a.eps = eps;
            if (rows == 0 || D == 0) return;
            py::gil_scoped_release release;
            rms_norm(pool, a);
        },
        py::arg("pool"), py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("bf16"), py::arg("eps"),
        "out = weight * norm(x) per row, as transformers' RMSNorm modules compute it (rms_norm.h)");

    // ---- rotary embedding of attention heads, after an optional per-head norm (rotary.h) -----------------
    m.def(
        "rotary",
        [](py::array x, py::array cos, py::array sin, py::array out, bool bf16, py::object norm_weight, float eps) {
            check_element(x, bf16, "x");
            check_element(cos, bf16, "cos");
            check_element(sin, bf16, "sin");
            check_element(out, bf16, "out");
            const int64_t item = bf16 ? 2 : 4;
            if (x.ndim() != 3 || cos.ndim() != 2 || sin.ndim() != 2) throw py::value_error("x must be [T, H, D], cos and sin [T, R]");
            RotaryArgs a;
            a.T = int(x.shape(0));
            a.H = int(x.shape(1));
            a.D = int(x.shape(2));
            a.R = int(cos.shape(1));
            if (a.D > 1024) throw py::value_error("heads of at most 1024 values");
            if (a.R % 2 || a.R > a.D || cos.shape(0) != a.T || sin.shape(0) != a.T || sin.shape(1) != a.R)
                throw py::value_error("cos and sin must be [T, R] with R even and at most the head size");
            if ((a.D > 1 && x.strides(2) != item) || (a.R > 1 && (cos.strides(1) != item || sin.strides(1) != item)) ||
                cos.strides(0) != sin.strides(0) || x.strides(0) < 0 || x.strides(1) < 0 || cos.strides(0) < 0)
                throw py::value_error("x's heads and cos / sin rows must be contiguous (cos and sin alike)");
            if (!(out.flags() & py::array::c_style) || !out.writeable() || out.ndim() != 3 || out.shape(0) != a.T ||
                out.shape(1) != a.H || out.shape(2) != a.D)
                throw py::value_error("out must be a writable C-contiguous [T, H, D] array");
            a.x = static_cast<const uint8_t*>(x.data());
            a.x_st = x.strides(0);
            a.x_sh = x.strides(1);
            a.out = static_cast<uint8_t*>(out.mutable_data());
            a.cos = static_cast<const uint8_t*>(cos.data());
            a.sin = static_cast<const uint8_t*>(sin.data());
            a.c_st = cos.strides(0);
            a.eps = eps;
            a.bf16 = bf16;
            a.norm_w = nullptr;
            py::array w;
            if (!norm_weight.is_none()) {
                w = py::reinterpret_borrow<py::array>(norm_weight);
                check_element(w, bf16, "norm_weight");
                if (w.ndim() != 1 || w.shape(0) != a.D || (a.D > 1 && w.strides(0) != item))
                    throw py::value_error("norm_weight must be a contiguous [D]");
                a.norm_w = w.data();
            }
            if (a.T == 0 || a.H == 0 || a.D == 0) return;
            rotary(a);
        },
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("bf16"), py::arg("norm_weight") = py::none(),
        py::arg("eps") = 0.0f,
        "out = rotary embedding (rotate-half, first R dims) of x [T, H, D], after a per-head RMSNorm with norm_weight");

    // ---- attention over a KV cache for decode steps (decode_attention.h) ---------------------------------
    m.attr("ATTENTION_MAX_TOKENS") = ATTENTION_MAX_TOKENS;
    m.def(
        "decode_attention",
        [](ThreadPool& pool, py::array q, py::array k, py::array v, py::array out, bool bf16, float scale,
           py::object mask, bool causal) {
            AttentionArgs a;
            a.bf16 = bf16;
            check_element(q, bf16, "q");
            check_element(k, bf16, "k");
            check_element(v, bf16, "v");
            check_element(out, bf16, "out");
            outer_strides(q, "q", a.q_sb, a.q_sh, a.q_st);
            outer_strides(k, "k", a.k_sb, a.k_sh, a.k_ss);
            outer_strides(v, "v", a.v_sb, a.v_sh, a.v_ss);
            a.B = int(q.shape(0));
            a.Hq = int(q.shape(1));
            a.T = int(q.shape(2));
            a.D = int(q.shape(3));
            a.Hkv = int(k.shape(1));
            a.S = int(k.shape(2));
            a.Dv = int(v.shape(3));
            if (a.T > ATTENTION_MAX_TOKENS)
                throw py::value_error("decode_attention takes at most " + std::to_string(ATTENTION_MAX_TOKENS) +
                                      " new tokens; prefill has its own path");
            if (k.shape(0) != a.B || v.shape(0) != a.B) throw py::value_error("q, k and v must have the same batch");
            if (a.Hkv < 1 || a.Hq % a.Hkv != 0)
                throw py::value_error("the query heads must be a multiple of the key/value heads");
            if (k.shape(3) != a.D) throw py::value_error("q and k must have the same head size");
            if (v.shape(1) != a.Hkv || v.shape(2) != a.S) throw py::value_error("k and v must have the same heads and length");
            if (!(out.flags() & py::array::c_style) || !out.writeable() || out.ndim() != 4 || out.shape(0) != a.B ||
                out.shape(1) != a.T || out.shape(2) != a.Hq || out.shape(3) != a.Dv)
                throw py::value_error("out must be a writable C-contiguous [B, T, Hq, Dv] array");
            a.q = static_cast<const uint8_t*>(q.data());
            a.k = static_cast<const uint8_t*>(k.data());
            a.v = static_cast<const uint8_t*>(v.data());
            a.out = static_cast<uint8_t*>(out.mutable_data());
            a.scale = scale;
            a.causal = causal;
            py::array mk;
            if (!mask.is_none()) {
                mk = py::reinterpret_borrow<py::array>(mask);
                int64_t m_sb, m_sh;
                outer_strides(mk, "mask", m_sb, m_sh, a.m_st);
                if (mk.dtype().is(py::dtype::of<bool>()) || mk.dtype().is(py::dtype::of<uint8_t>())) a.mask_kind = MASK_KEEP;
                else if (mk.dtype().is(py::dtype::of<float>())) a.mask_kind = MASK_BIAS;
                else throw py::type_error("mask must be bool (True: attend) or float32 (added to the scores)");
                if ((mk.shape(0) != a.B && mk.shape(0) != 1) || (mk.shape(1) != a.Hq && mk.shape(1) != 1) ||
                    mk.shape(2) != a.T || mk.shape(3) != a.S)
                    throw py::value_error("mask must be [B or 1, Hq or 1, T, S]");
                a.mask = static_cast<const uint8_t*>(mk.data());
                a.m_sb = mk.shape(0) == 1 ? 0 : m_sb;
                a.m_sh = mk.shape(1) == 1 ? 0 : m_sh;
            }
            if (a.B == 0 || a.T == 0 || a.Hq == 0 || a.Dv == 0) return;
            py::gil_scoped_release release;
            decode_attention(pool, a);
        },
        py::arg("pool"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("bf16"), py::arg("scale"),
        py::arg("mask") = py::none(), py::arg("causal") = false,
        "attention of q [B, Hq, T, D] over k [B, Hkv, S, D] / v [B, Hkv, S, Dv] into out [B, T, Hq, Dv] (decode)");

    // ---- host tasks: the CPU half of the hybrid step, run from a device stream (host_tasks.h) ----------
    py::class_<HostWorker>(m, "HostWorker", py::module_local(),
                           "one thread that runs enqueued host tasks in order (worker 0 of their pool)")
        .def(py::init<>())
        .def_property_readonly("tasks_run", &HostWorker::tasks_run);

    py::class_<HostTask>(m, "HostTask", py::module_local(),
                         "a forward with fixed buffers, started by the enqueue host function and joined by the "
                         "sync host function (both take the task's address as user data)")
        .def(py::init([](const MoELayer& L, ThreadPool& pool, HostWorker& worker, py::array hidden, bool hidden_bf16,
                         py::array ids, py::array weights, py::array out, bool out_bf16) {
                 const ForwardArrays a = check_forward_arrays(L, hidden, hidden_bf16, ids, weights, out, out_bf16);
                 return new HostTask(&L, &pool, &worker, a.hidden, hidden_bf16, a.T, a.K, a.ids, a.weights, a.out,
                                     out_bf16, a.out_bytes);
             }),
             // The layer, pool, worker and buffers live as long as the task (its pointers stay valid).
             py::keep_alive<1, 2>(), py::keep_alive<1, 3>(), py::keep_alive<1, 4>(), py::keep_alive<1, 5>(),
             py::keep_alive<1, 7>(), py::keep_alive<1, 8>(), py::keep_alive<1, 9>(), py::arg("layer"),
             py::arg("pool"), py::arg("worker"), py::arg("hidden"), py::arg("hidden_bf16"), py::arg("topk_ids"),
             py::arg("topk_weights"), py::arg("out"), py::arg("out_bf16"))
        .def_property_readonly("address", [](const HostTask& t) { return reinterpret_cast<uintptr_t>(&t); },
                               "the user data to pass to the host functions")
        .def_property_readonly("tokens", [](const HostTask& t) { return t.T; })
        .def_property_readonly("submitted", [](const HostTask& t) { return t.submitted.load(); })
        .def_property_readonly("completed", [](const HostTask& t) { return t.completed.load(); })
        .def("error",
             [](const HostTask& t) -> py::object {
                 const int code = t.error_code.load(std::memory_order_acquire);
                 if (code == HOST_OK) return py::none();
                 return py::make_tuple(code, std::string(t.error_message));
             },
             "None, or (code, message) of the first error a run hit (1: expert id out of range)")
        .def("clear_error", [](HostTask& t) { t.error_code.store(HOST_OK, std::memory_order_release); })
        .def("wait",
             [](HostTask& t) {
                 py::gil_scoped_release release;
                 t.worker->wait_for(&t, t.submitted.load(std::memory_order_acquire));
             },
             "block until every enqueue so far has run");

    m.def(
        "host_function_addresses",
        []() {
            py::dict d;
            d["enqueue"] = reinterpret_cast<uintptr_t>(&moetier_host_enqueue);
            d["sync"] = reinterpret_cast<uintptr_t>(&moetier_host_sync);
            return d;
        },
        "addresses of the C host functions void fn(void* task): enqueue and sync");

    py::class_<HostCallbackThread>(m, "HostCallbackThread", py::module_local(),
                                   "runs host functions in launch order on one native thread (the CPU stand-in "
                                   "of a device stream's host functions)")
        .def(py::init<>())
        .def("launch",
             [](HostCallbackThread& h, uintptr_t fn, uintptr_t data) {
                 if (fn == 0) throw py::value_error("host function address is null");
                 return h.launch(reinterpret_cast<host_fn_t>(fn), reinterpret_cast<void*>(data));
             },
             py::arg("fn"), py::arg("data"))
        .def_property_readonly("launched", &HostCallbackThread::launched)
        .def_property_readonly("executed", &HostCallbackThread::executed)
        .def("wait_executed",
             [](HostCallbackThread& h, uint64_t n) {
                 py::gil_scoped_release release;
                 h.wait_executed(n);
             },
             py::arg("n"));
}
