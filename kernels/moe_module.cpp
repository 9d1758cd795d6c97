// pybind11 bindings of one ISA variant: moetier.backends.native._moe_<variant>.
//
// The Python side hands numpy views of torch tensors (bf16 as uint16, fp8 as uint8); nothing here links
// against libtorch. Every size is checked before a pointer is touched, and compute runs with the GIL
// released so a forward overlaps with Python (and GPU) work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "amx_permission.h"
#include "moe_layer.h"

namespace py = pybind11;

namespace moetier_kernels {
inline namespace MOETIER_NS {
namespace {

struct FormatSpec {
    int fmt, group;
};

FormatSpec parse_format(const std::string& name) {
    if (name == "fp32") return {F32, 0};
    if (name == "fp16") return {F16, 0};
    if (name == "bf16") return {BF16, 0};
    if (name == "int8") return {I8, 0};
    if (name == "fp8_e4m3") return {FP8, 0};
    if (name == "int4_g32") return {I4, 32};
    if (name == "int4_g64") return {I4, 64};
    if (name == "int4_g128") return {I4, 128};
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
        .def_property_readonly("pinned", &ThreadPool::pinned_count);

    py::class_<MoELayer>(m, "MoELayer", py::module_local())
        .def(py::init([](int num_experts, int hidden, int intermediate, const std::string& fmt,
                         const std::string& activation, float alpha, float limit, bool has_bias,
                         bool int8_activations, bool fp8_vbmi) {
                 const FormatSpec f = parse_format(fmt);
                 return new MoELayer(num_experts, hidden, intermediate, f.fmt, f.group, activation_code(activation),
                                     alpha, limit, has_bias, int8_activations, fp8_vbmi);
             }),
             py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("fmt"),
             py::arg("activation") = "silu", py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f,
             py::arg("has_bias") = false, py::arg("int8_activations") = true, py::arg("fp8_vbmi") = true)
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
               py::array weights, py::array out, bool out_bf16) {
                const Geometry& dn = L.down_geometry();
                const int H = dn.N;
                if (hidden.ndim() != 2 || hidden.shape(1) != H) throw py::value_error("hidden must be [T, hidden]");
                const int T = int(hidden.shape(0));
                if (ids.ndim() != 2 || ids.shape(0) != T || ids.shape(1) < 1)
                    throw py::value_error("topk_ids must be [T, k]");
                const int K = int(ids.shape(1));
                if (!ids.dtype().is(py::dtype::of<int64_t>())) throw py::type_error("topk_ids must be int64");
                if (!weights.dtype().is(py::dtype::of<float>())) throw py::type_error("topk_weights must be float32");
                if (hidden_bf16 ? hidden.itemsize() != 2 : !hidden.dtype().is(py::dtype::of<float>()))
                    throw py::type_error("hidden must be float32 or bf16 bits (uint16)");
                if (out_bf16 ? out.itemsize() != 2 : !out.dtype().is(py::dtype::of<float>()))
                    throw py::type_error("out must be float32 or bf16 bits (uint16)");
                if (!out.writeable()) throw py::value_error("out must be writable");
                const void* hp = bytes_of(hidden, int64_t(T) * H * (hidden_bf16 ? 2 : 4), "hidden");
                const int64_t* ip = reinterpret_cast<const int64_t*>(bytes_of(ids, int64_t(T) * K * 8, "topk_ids"));
                const float* wp = reinterpret_cast<const float*>(bytes_of(weights, int64_t(T) * K * 4, "topk_weights"));
                bytes_of(out, int64_t(T) * H * (out_bf16 ? 2 : 4), "out");
                void* op = out.mutable_data();
                if (T == 0) return;
                py::gil_scoped_release release;
                L.forward(pool, hp, hidden_bf16, T, K, ip, wp, op, out_bf16);
            },
            py::arg("pool"), py::arg("hidden"), py::arg("hidden_bf16"), py::arg("topk_ids"), py::arg("topk_weights"),
            py::arg("out"), py::arg("out_bf16"));
}
