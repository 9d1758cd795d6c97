// One MoE layer's held experts in the packed layout, and the fused forward over them.
//
// forward: route (token, slot) pairs to held experts; phase 0 converts the activations once (fp32, and
// bf16 / int8 copies when a kernel wants them); phase 1 runs gate+up+activation per (expert, run of
// bundles) into h. Phase 2: a decode expert (<= DECODE_MAX_TOKENS rows) streams its down matrix in long
// runs of whole bundles into its own rows of Y; the prefill experts run down per block of output panels,
// looping over the experts, and accumulate w * (down h + bias) in fp32, so no two tasks ever write the
// same element. Phase 3 (when there are decode rows, or several NUMA nodes, each of which reduces its
// own prefill experts into its own buffer) sums per token: the nodes' buffers, then the token's decode
// rows in expert-id order. The order of every sum is fixed, so results do not depend on thread count.
#pragma once
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "amx_kernels.h"
#include "huge_pages.h"
#include "fp8_vbmi.h"
#include "panel_kernels.h"
#include "thread_pool.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

enum Act : int { SILU = 0, SWIGLU_OAI = 1 };
constexpr int DECODE_MAX_TOKENS = 4;  // tokens per expert up to which the streaming decode kernels run
constexpr int INT8_DECODE_MIN_K = 256;  // shortest rows (hidden and intermediate) for int8-activation decode
constexpr int GU_PREFILL_BUNDLES = 2;   // gate/up bundles (4 pairs) per phase-1 task of a prefill expert
// Up to this many tokens per expert the dot kernels take whole bundles (one sequential stream) in blocks of
// BUNDLE_TOKENS tokens; more take two panels x DOT_BLOCK tokens per call.
constexpr int BUNDLE_MAX_TOKENS = 16;
constexpr int BUNDLE_TOKENS = 4;
// Decode tasks stream about this many contiguous bytes of one expert: every jump to another stream
// costs the core a DRAM latency before the prefetchers run again (one core, bf16-like work: runs of
// 128 KiB reach ~85% of the plain read rate, 512 KiB ~95%).
constexpr int64_t DECODE_RUN_BYTES = 512 << 10;
constexpr int DN_CHUNK_MIN = BUNDLE;    // down panels per prefill phase-2 task: at least, at most
constexpr int DN_CHUNK_MAX = 4 * BUNDLE;
constexpr int TILE_ROW_PAD = AMX_TOKENS;  // rows past the last one that AMX tile loads may read

// Memory for packed experts: huge-page chunks (huge_pages.h) shared by the experts of a layer, so huge
// pages back all of it (an expert in a mapping of its own is rarely 2 MiB-aligned: a 2.6 MiB int4 expert
// got at most one huge page). On a multi-node machine each node has its own chunks, preferred on that
// node's memory. Untouched parts of a chunk cost address space only; its size follows the number of experts
// the caller will pack (a disk-cache entry of one expert maps just that expert, not 64 MiB).
class NodeBuffer {
   public:
    NodeBuffer(size_t bytes, int node, int num_nodes)
        : bytes_(moetier_os::round_up_small(bytes)), ptr_(moetier_os::map_huge(bytes_)) {
#ifdef SYS_mbind
        if (num_nodes > 1 && node >= 0 && node < 64) {
            unsigned long mask = 1ul << node;
            syscall(SYS_mbind, ptr_, bytes_, 1 /* MPOL_PREFERRED */, &mask, 64ul, 0u);
        }
#endif
    }
    ~NodeBuffer() { moetier_os::unmap_huge(ptr_, bytes_); }
    NodeBuffer(const NodeBuffer&) = delete;
    NodeBuffer& operator=(const NodeBuffer&) = delete;
    uint8_t* data() const { return ptr_; }
    size_t size() const { return bytes_; }

   private:
    size_t bytes_ = 0;  // before ptr_: the mapping's size is computed first
    uint8_t* ptr_ = nullptr;
};

// Bump allocation of expert buffers from per-node chunks (thread-safe: experts are packed in parallel).
class ExpertArena {
   public:
    static constexpr size_t CHUNK = size_t(64) << 20;
    static constexpr size_t ALIGN = 4096;
    // The chunk for `bytes` total (what the owner expects to allocate), capped at CHUNK.
    void expect(size_t bytes) { chunk_ = std::min(CHUNK, moetier_os::round_up_small(std::max<size_t>(bytes, 1))); }
    uint8_t* allocate(size_t bytes, int node, int num_nodes) {
        std::lock_guard<std::mutex> lk(m_);
        const size_t n = size_t(std::max(0, node));
        if (n >= open_.size()) open_.resize(n + 1, Open{});
        Open& o = open_[n];
        const size_t need = size_t(round_up(int64_t(bytes), ALIGN));
        if (!o.chunk || o.used + need > o.chunk->size()) {
            chunks_.push_back(std::make_unique<NodeBuffer>(std::max(chunk_, need), int(n), num_nodes));
            o = Open{chunks_.back().get(), 0};
        }
        uint8_t* p = o.chunk->data() + o.used;
        o.used += need;
        return p;
    }

   private:
    struct Open {  // per node: the chunk being filled
        NodeBuffer* chunk = nullptr;
        size_t used = 0;
    };
    size_t chunk_ = CHUNK;
    std::mutex m_;
    std::vector<std::unique_ptr<NodeBuffer>> chunks_;
    std::vector<Open> open_;
};

struct ExpertSlot {
    int id = -1, node = 0;
    uint8_t* mem = nullptr;  // in the layer's arena: gate/up panels interleaved (g0 u0 g1 u1 ...), then down panels
    std::vector<float> bg, bu, bd;    // zero-padded biases (empty without biases)
};

// P_DEQDOT: fp8/fp16 panels dequantized to bf16 in L2, then vdpbf16ps (prefill only). P_FP8DOT: fp8 with
// the VBMI lookups and vdpbf16ps (decode with bf16 hi + lo activations, prefill with bf16 ones). P_AMX_*:
// the amx build's prefill on tiles: bf16 panels, int8 panels with int8 activations, fp8/fp16 dequantized
// to bf16.
enum Path : int {
    P_F32 = 0, P_BF16DOT = 1, P_INT8DOT = 2, P_DEQDOT = 3, P_FP8DOT = 4, P_AMX_BF16 = 5, P_AMX_INT8 = 6, P_AMX_DEQ = 7
};
inline bool is_amx(int path) { return path == P_AMX_BF16 || path == P_AMX_INT8 || path == P_AMX_DEQ; }
inline bool is_deq(int path) { return path == P_DEQDOT || path == P_AMX_DEQ; }
// Paths whose activations (x for gate/up, h for down) are bf16, and whose are int8 with per-row scales.
inline bool bf16_acts(int path) { return path == P_BF16DOT || is_deq(path) || path == P_AMX_BF16 || path == P_FP8DOT; }
inline bool i8_acts(int path) { return path == P_INT8DOT || path == P_AMX_INT8; }
// Paths whose decode reads activations as bf16 hi + lo parts (fp32 activations to ~16 bits, exact for
// activations that are bf16 already: one product then).
inline bool split_acts(int path) { return path == P_FP8DOT || path == P_BF16DOT; }
// Whether an expert of M tokens on `path` runs whole bundles per call (decode, and the dot paths up to
// BUNDLE_MAX_TOKENS tokens), or two panels per call.
inline bool bundle_path(int path, int M) {
    if (M <= DECODE_MAX_TOKENS) return !is_amx(path);
    return M <= BUNDLE_MAX_TOKENS && (path == P_BF16DOT || path == P_INT8DOT || path == P_FP8DOT);
}

// The kernel path of a matrix of geometry `g` (shortest row length min_k among the matrices computed
// together) for a prefill (more than DECODE_MAX_TOKENS rows) or a decode call. bf16 takes vdpbf16ps for
// decode too, on activations split into bf16 hi + lo parts (one product where they are bf16 already):
// widening the weights to fp32 for FMAs held a Qwen3 layer at 46 GB/s on 2 cores against an 80 GB/s
// read probe (2026-11-30). Integer weights also take
// vpdpbusd for decode on model-sized rows: unpacking them to fp32 costs more instructions per byte than a
// core issues at DRAM speed (measured ~15 GB/s int8, ~10 GB/s int4 per core). On short rows (< INT8_DECODE_MIN_K)
// a token's quantization error does not average out (up to 7% on a 16 x 8 expert), and the exact path
// costs nothing there. int4 and grouped int8 keep vpdpbusd on AMX builds: per-group scales (and mins)
// would need a tile store per 16-128 columns.
inline int choose_path(const Geometry& g, bool prefill, int min_k, bool int8_acts, bool fp8_vbmi) {
    int path = P_F32;
    if (MOETIER_HAS_DOT) {
        if (fp8_vbmi) path = P_FP8DOT;
        else if (g.fmt == BF16) path = P_BF16DOT;
        else if ((g.fmt == FP8 || g.fmt == F16) && prefill) path = P_DEQDOT;
    }
    // Every build has the integer dot kernel (vpdpbusd, or vpmaddubsw + vpmaddwd without VNNI).
    if ((g.fmt == I8 || g.fmt == I4) && int8_acts && (prefill || min_k >= INT8_DECODE_MIN_K)) path = P_INT8DOT;
    if (MOETIER_HAS_AMX && prefill) {
        if (path == P_BF16DOT) path = P_AMX_BF16;
        else if (path == P_DEQDOT || path == P_FP8DOT) path = P_AMX_DEQ;
        else if (path == P_INT8DOT && g.fmt == I8 && g.row_scales) path = P_AMX_INT8;
    }
    return path;
}

struct TaskQueue {
    std::vector<std::array<int, 3>> items;
    std::atomic<int> next{0};
};

class MoELayer {
   public:
    // gate_up, down: the formats of the gate/up and of the down matrices, which may differ (GGUF's Q4_K_M
    // keeps some down matrices in Q6_K): each projection has its own geometry and kernel path.
    // fp8_vbmi: compute fp8 with the VBMI kernels (fp8_vbmi.h) where this build and CPU can.
    MoELayer(int num_experts, int H, int I, MatFormat gate_up, MatFormat down, int act, float alpha, float limit,
             bool has_bias, bool int8_activations, bool fp8_vbmi = true, int capacity = 0)
        : num_experts_(num_experts), H_(H), I_(I), act_(act), alpha_(alpha), limit_(limit),
          has_bias_(has_bias), int8_acts_(int8_activations), gu_(gate_up, I, H),
          dn_(down, H, I), gu_deq_(MatFormat{BF16}, I, gu_.Kp), dn_deq_(MatFormat{BF16}, H, dn_.Kp) {
        if (num_experts < 1) throw std::invalid_argument("num_experts must be positive");
        if (act != SILU && act != SWIGLU_OAI) throw std::invalid_argument("unknown activation code");
        slot_of_.assign(num_experts, -1);
#if MOETIER_HAS_DOT
        const bool vbmi = fp8_vbmi && cpu_has_vbmi();
        gu_.fp8_pairs = gu_.fmt == FP8 && vbmi;
        dn_.fp8_pairs = dn_.fmt == FP8 && vbmi;
#endif
        fp8_vbmi_ = gu_.fp8_pairs || dn_.fp8_pairs;
        // capacity: how many experts will be packed (0: all of them); expert_bytes follows the fp8 layout.
        const size_t n = size_t(capacity > 0 ? std::min(capacity, num_experts) : num_experts);
        arena_.expect(n * moetier_os::round_up_small(size_t(expert_bytes())));
    }

    const Geometry& gate_up_geometry() const { return gu_; }
    const Geometry& down_geometry() const { return dn_; }
    int64_t expert_bytes() const { return 2 * gu_.bytes() + dn_.bytes(); }
    int num_slots() const { return int(slots_.size()); }
    int num_experts() const { return num_experts_; }
    bool int8_activations() const { return int8_acts_; }
    bool fp8_vbmi() const { return fp8_vbmi_; }
    static bool has_dot_kernels() { return MOETIER_HAS_DOT; }

    // Pack one expert (reference storage, see PanelSource). Biases: fp32 [I], [I], [H] or null.
    void add_expert(int id, const uint8_t* g, const float* gs, const uint8_t* u, const float* us, const uint8_t* d,
                    const float* ds, const float* bg, const float* bu, const float* bd, int node, int num_nodes) {
        if (id < 0 || id >= num_experts_) throw std::out_of_range("expert id out of range");
        {
            std::lock_guard<std::mutex> lk(slots_m_);
            if (slot_of_[id] >= 0) throw std::invalid_argument("expert " + std::to_string(id) + " is already packed");
        }
        auto slot = std::make_unique<ExpertSlot>();
        slot->id = id;
        slot->node = node < 0 ? 0 : node;
        uint8_t* base = slot->mem = arena_.allocate(size_t(expert_bytes()), node, num_nodes);
        // Gate and up panels alternate (g0 u0 g1 u1 ...), so a bundle holds two gate/up pairs.
        std::vector<PanelSource> src(size_t(2) * gu_.panels);
        for (int p = 0; p < gu_.panels; ++p) {
            src[2 * p] = {g, gs, p};
            src[2 * p + 1] = {u, us, p};
        }
        pack_panels(gu_, 2 * gu_.panels, src.data(), base);
        src.resize(dn_.panels);
        for (int p = 0; p < dn_.panels; ++p) src[p] = {d, ds, p};
        pack_panels(dn_, dn_.panels, src.data(), down_of(base));
        if (has_bias_) {
            slot->bg.assign(size_t(gu_.panels) * PANEL, 0.f);
            slot->bu.assign(size_t(gu_.panels) * PANEL, 0.f);
            slot->bd.assign(size_t(dn_.panels) * PANEL, 0.f);
            if (bg) std::copy(bg, bg + I_, slot->bg.begin());
            if (bu) std::copy(bu, bu + I_, slot->bu.begin());
            if (bd) std::copy(bd, bd + H_, slot->bd.begin());
        }
        std::lock_guard<std::mutex> lk(slots_m_);  // experts may be packed from several threads at once
        if (slot_of_[id] >= 0) throw std::invalid_argument("expert " + std::to_string(id) + " is already packed");
        slot_of_[id] = int(slots_.size());
        slots_.push_back(std::move(slot));
    }

    // hidden [T, H] fp32 or bf16 bits; ids [T, k] int64 (validated by the caller); w [T, k] fp32;
    // out [T, H] fp32 or bf16 bits, fully overwritten.
    void forward(ThreadPool& pool, const void* hidden, bool hidden_bf16, int T, int K, const int64_t* ids,
                 const float* w, void* out, bool out_bf16) const;

   private:
    int num_experts_, H_, I_, act_;
    float alpha_, limit_;
    bool has_bias_, int8_acts_;
    bool fp8_vbmi_ = false;
    Geometry gu_, dn_;
    Geometry gu_deq_, dn_deq_;  // fp8/fp16 panels dequantized to bf16 pairs (prefill)
    std::vector<int> slot_of_;
    std::vector<std::unique_ptr<ExpertSlot>> slots_;
    std::mutex slots_m_;
    ExpertArena arena_;

    const uint8_t* down_of(const uint8_t* mem) const { return mem + 2 * gu_.bytes(); }
    uint8_t* down_of(uint8_t* mem) const { return mem + 2 * gu_.bytes(); }
    Panels gu_bundle(const ExpertSlot& s, int b) const { return bundle(s.mem, gu_, 2 * gu_.panels, b); }
    Panels dn_bundle(const ExpertSlot& s, int b) const { return bundle(down_of(s.mem), dn_, dn_.panels, b); }

    struct Ctx;
    void phase_convert(Ctx& c, int t0, int t1) const;
    void phase_gather(Ctx& c, int i0, int i1) const;
    void phase_gate_up(Ctx& c, int a, int b0, int b1) const;
    void phase_quantize_h(Ctx& c, int r0, int r1) const;
    void phase_down(Ctx& c, int node, int p0, int p1) const;
    void phase_down_decode(Ctx& c, int a, int b0, int b1) const;
    void phase_reduce(Ctx& c, int t0, int t1) const;
    void write_out(Ctx& c, const float* acc, int t0, int t1, int c0, int c1) const;
};

struct MoELayer::Ctx {
    int T = 0;
    const void* hidden = nullptr;
    bool hidden_bf16 = false, out_bf16 = false;
    void* out = nullptr;
    // routing: active slots (ascending expert id), their rows [row0, row0 + M), the kernel paths of their
    // gate/up (act_path) and down (act_dpath) projections
    std::vector<int> act_slot, act_row0, act_m, act_path, act_dpath;
    std::vector<int> row_tok;
    std::vector<float> row_w;
    std::vector<std::vector<int>> node_prefill;  // per node: prefill experts (indices into act_*)
    std::vector<int> active_nodes;               // nodes with prefill experts
    // Decode experts (<= DECODE_MAX_TOKENS rows) write down(h) + bias per row into Y; the final phase adds
    // each token's decode rows, in expert-id order, after its prefill sum.
    std::vector<int> row_y;                    // per row of a decode expert: its row in Y (else -1)
    std::vector<int> tok_ystart, tok_yrows;    // per token: its decode rows, in expert-id order
    bool any_decode = false;
    bool need_xb = false, need_xq = false, need_xl = false;  // forms of x the gate/up paths read
    bool need_hl = false;                                    // h's bf16 low part (fp8 down decode)
    std::vector<uint8_t> x_exact;  // per token: x is exactly bf16 (its low part Xl is zero)
    int xs = 0, hs = 0, hp = 0;  // row strides: activations, h, output accumulator (and Y)
    // Scratch (not zero-initialized; every element read is written first), see Scratch.
    float *X = nullptr, *Xscale = nullptr, *Hf = nullptr, *Hscale = nullptr, *acc = nullptr, *Y = nullptr;
    uint16_t *Xb = nullptr, *Hb = nullptr;
    uint16_t *Xl = nullptr, *Hl = nullptr;  // bf16 low parts: x - bf16(x), for fp8 decode
    int8_t *Xq = nullptr, *Hq = nullptr;
    int32_t *Xcorr = nullptr, *Hcorr = nullptr;  // per row and group: c * sum of the codes (gemm_int8dot)
    int xgroups = 0, hgroups = 0;
    std::vector<int> q_rows;  // rows whose h is quantized for the int8 dot path
    // AMX: the activation rows of tile-path experts gathered in row order (bf16, or int8 with scales)
    std::vector<int> g_rows;
    uint8_t* Xg = nullptr;
    float* Xgscale = nullptr;
    int64_t xg_stride = 0;  // bytes
};

// Per-thread scratch that only grows: a fresh allocation per call would page-fault and zero tens of
// megabytes for a prefill batch. thread_local keeps concurrent callers (and pool workers) apart.
template <class T>
inline T* scratch(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}
struct Scratch {
    std::vector<float> X, Xscale, Xgscale, Hf, Hscale, acc, Y;
    std::vector<uint16_t> Xb, Hb, Xl, Hl;
    std::vector<int8_t> Xq, Hq;
    std::vector<int32_t> Xcorr, Hcorr;
    std::vector<uint8_t> deq, Xg;
};
inline Scratch& thread_scratch() {
    static thread_local Scratch s;
    return s;
}

// ---- kernel dispatch on the runtime token-block size and panel count ----------------------------------
template <int NP, class D, bool SC, bool MN = false, int SK = SCALE_F32>
MOE_INLINE void run_f32(int mb, const Panels& pn, const Geometry& g, const float* const* x, float* o) {
    switch (mb) {
        case 1: gemm_f32<D, 1, NP, SC, MN, SK>(pn, g, x, o); break;
        case 2: gemm_f32<D, 2, NP, SC, MN, SK>(pn, g, x, o); break;
        case 3: gemm_f32<D, 3, NP, SC, MN, SK>(pn, g, x, o); break;
        default: gemm_f32<D, 4, NP, SC, MN, SK>(pn, g, x, o); break;
    }
}
template <int NP>
inline void run_f32_fmt(int fmt, int mb, const Panels& pn, const Geometry& g, const float* const* x, float* o) {
    switch (fmt) {
        case F32: run_f32<NP, DecF32, false>(mb, pn, g, x, o); break;
        case F16: run_f32<NP, DecF16, false>(mb, pn, g, x, o); break;
        case BF16: run_f32<NP, DecBF16, false>(mb, pn, g, x, o); break;
        // The scale kinds each format packs into (Geometry's checks): the kernels are instantiated per kind.
        case I8:
            if (g.crumbs && g.mins) run_f32<NP, DecCrumb<0, 0>, true, true, SCALE_K>(mb, pn, g, x, o);  // q2_k
            else if (g.crumbs) run_f32<NP, DecCrumb<1, 4>, true, false, SCALE_K>(mb, pn, g, x, o);  // q3_k
            else if (g.hbits == 1 && g.scale_kind == SCALE_F16) {
                if (g.mins) run_f32<NP, DecSplit<1, 0>, true, true, SCALE_F16>(mb, pn, g, x, o);  // q5_1
                else run_f32<NP, DecSplit<1, 16>, true, false, SCALE_F16>(mb, pn, g, x, o);  // q5_0
            } else if (g.hbits == 1) run_f32<NP, DecSplit<1, 0>, true, true, SCALE_K>(mb, pn, g, x, o);  // q5_k
            else if (g.hbits == 2) run_f32<NP, DecSplit<2, 32>, true, false, SCALE_K>(mb, pn, g, x, o);  // q6_k
            else if (g.mins) run_f32<NP, DecI8, true, true>(mb, pn, g, x, o);
            else if (g.scale_kind == SCALE_F16) run_f32<NP, DecI8, true, false, SCALE_F16>(mb, pn, g, x, o);
            else run_f32<NP, DecI8, true>(mb, pn, g, x, o);
            break;
        case I4:
            if (g.mins && g.scale_kind == SCALE_K) run_f32<NP, DecU4, true, true, SCALE_K>(mb, pn, g, x, o);
            else if (g.mins && g.scale_kind == SCALE_F16) run_f32<NP, DecU4, true, true, SCALE_F16>(mb, pn, g, x, o);  // q4_1
            else if (g.mins) run_f32<NP, DecU4, true, true>(mb, pn, g, x, o);
            else if (g.e2m1) run_f32<NP, DecE2M1, true, false, SCALE_E8M0>(mb, pn, g, x, o);
            else if (g.iq4 && g.scale_kind == SCALE_K) run_f32<NP, DecIQ4, true, false, SCALE_K>(mb, pn, g, x, o);
            else if (g.iq4) run_f32<NP, DecIQ4, true, false, SCALE_F16>(mb, pn, g, x, o);
            else if (g.scale_kind == SCALE_F16) run_f32<NP, DecI4, true, false, SCALE_F16>(mb, pn, g, x, o);
            else run_f32<NP, DecI4, true>(mb, pn, g, x, o);
            break;
        default: run_f32<NP, DecFP8, true>(mb, pn, g, x, o); break;
    }
}
// `np` (1-4) panels starting at pn.q0.
inline void run_f32_np(int np, int fmt, int mb, const Panels& pn, const Geometry& g, const float* const* x, float* o) {
    switch (np) {
        case 1: run_f32_fmt<1>(fmt, mb, pn, g, x, o); break;
        case 2: run_f32_fmt<2>(fmt, mb, pn, g, x, o); break;
        case 3: run_f32_fmt<3>(fmt, mb, pn, g, x, o); break;
        default: run_f32_fmt<4>(fmt, mb, pn, g, x, o); break;
    }
}
constexpr int F32_BLOCK = 4;
// Tokens per call of the dot kernels' prefill blocks (two panels each): AVX2 has half the registers.
constexpr int DOT_BLOCK = kAvx512 ? 8 : 4;
// gemm_int8dot for int4 / int8 panels, with or without mins.
template <int M, int NP>
MOE_INLINE void int8dot(int fmt, const Panels& pn, const Geometry& g, const int8_t* const* xq,
                        const int32_t* const* xc, const float* xs, float* o) {
    if (fmt == I4) {
        if (g.mins && g.scale_kind == SCALE_K) gemm_int8dot<true, true, M, NP, SCALE_K>(pn, g, xq, xc, xs, o);
        else if (g.mins && g.scale_kind == SCALE_F16) gemm_int8dot<true, true, M, NP, SCALE_F16>(pn, g, xq, xc, xs, o);
        else if (g.mins) gemm_int8dot<true, true, M, NP>(pn, g, xq, xc, xs, o);
        else if (g.e2m1) gemm_int8dot<true, false, M, NP, SCALE_E8M0>(pn, g, xq, xc, xs, o);
        else if (g.iq4 && g.scale_kind == SCALE_K) gemm_int8dot<true, false, M, NP, SCALE_K, 0, true>(pn, g, xq, xc, xs, o);
        else if (g.iq4) gemm_int8dot<true, false, M, NP, SCALE_F16, 0, true>(pn, g, xq, xc, xs, o);
        else if (g.scale_kind == SCALE_F16) gemm_int8dot<true, false, M, NP, SCALE_F16>(pn, g, xq, xc, xs, o);
        else gemm_int8dot<true, false, M, NP>(pn, g, xq, xc, xs, o);
    } else {
        if (g.crumbs && g.mins) gemm_int8dot<false, true, M, NP, SCALE_K, 0, false, true>(pn, g, xq, xc, xs, o);  // q2_k
        else if (g.crumbs) gemm_int8dot<false, false, M, NP, SCALE_K, 1, false, true>(pn, g, xq, xc, xs, o);  // q3_k
        else if (g.hbits == 1 && g.scale_kind == SCALE_F16) {
            if (g.mins) gemm_int8dot<false, true, M, NP, SCALE_F16, 1>(pn, g, xq, xc, xs, o);  // q5_1
            else gemm_int8dot<false, false, M, NP, SCALE_F16, 1>(pn, g, xq, xc, xs, o);  // q5_0
        } else if (g.hbits == 1) gemm_int8dot<false, true, M, NP, SCALE_K, 1>(pn, g, xq, xc, xs, o);  // q5_k
        else if (g.hbits == 2) gemm_int8dot<false, false, M, NP, SCALE_K, 2>(pn, g, xq, xc, xs, o);  // q6_k
        else if (g.mins) gemm_int8dot<false, true, M, NP>(pn, g, xq, xc, xs, o);
        else if (g.scale_kind == SCALE_F16) gemm_int8dot<false, false, M, NP, SCALE_F16>(pn, g, xq, xc, xs, o);
        else gemm_int8dot<false, false, M, NP>(pn, g, xq, xc, xs, o);
    }
}
template <int NP, int M>
MOE_INLINE void run_dot_m(int path, int fmt, const Panels& pn, const Geometry& g, const uint16_t* const* xb,
                          const int8_t* const* xq, const int32_t* const* xc, const float* xs, float* o) {
#if MOETIER_HAS_DOT
    if (path == P_BF16DOT) return gemm_bf16dot<M, NP>(pn, g, xb, o);
#else
    (void)path, (void)xb;
#endif
    int8dot<M, NP>(fmt, pn, g, xq, xc, xs, o);
}
template <int NP>
inline void run_dot(int path, int fmt, int mb, const Panels& pn, const Geometry& g, const uint16_t* const* xb,
                    const int8_t* const* xq, const int32_t* const* xc, const float* xs, float* o) {
    switch (mb) {
        case 1: run_dot_m<NP, 1>(path, fmt, pn, g, xb, xq, xc, xs, o); break;
        case 2: run_dot_m<NP, 2>(path, fmt, pn, g, xb, xq, xc, xs, o); break;
        case 3: run_dot_m<NP, 3>(path, fmt, pn, g, xb, xq, xc, xs, o); break;
        case 4: run_dot_m<NP, 4>(path, fmt, pn, g, xb, xq, xc, xs, o); break;
        case 5:
            if constexpr (DOT_BLOCK == 8) run_dot_m<NP, 5>(path, fmt, pn, g, xb, xq, xc, xs, o);
            break;
        case 6:
            if constexpr (DOT_BLOCK == 8) run_dot_m<NP, 6>(path, fmt, pn, g, xb, xq, xc, xs, o);
            break;
        case 7:
            if constexpr (DOT_BLOCK == 8) run_dot_m<NP, 7>(path, fmt, pn, g, xb, xq, xc, xs, o);
            break;
        default:
            if constexpr (DOT_BLOCK == 8) run_dot_m<NP, 8>(path, fmt, pn, g, xb, xq, xc, xs, o);
            break;
    }
}
// Calls go(MC, NC) with MC = mb (1..4 tokens) and NC = np (1..4 panels) as compile-time constants: the
// kernels of a whole bundle are instantiated once per (tokens, panels) pair.
template <class Go>
inline void bundle_tiles(int np, int mb, Go&& go) {
    auto with_np = [&](auto MC) {
        switch (np) {
            case 1: go(MC, std::integral_constant<int, 1>{}); break;
            case 2: go(MC, std::integral_constant<int, 2>{}); break;
            case 3: go(MC, std::integral_constant<int, 3>{}); break;
            default: go(MC, std::integral_constant<int, 4>{}); break;
        }
    };
    switch (mb) {
        case 1: with_np(std::integral_constant<int, 1>{}); break;
        case 2: with_np(std::integral_constant<int, 2>{}); break;
        case 3: with_np(std::integral_constant<int, 3>{}); break;
        default: with_np(std::integral_constant<int, 4>{}); break;
    }
}
// A whole bundle (`np` = 1-4 panels) x up to DECODE_MAX_TOKENS tokens on the int8 dot kernel (decode).
inline void int8_decode(int fmt, int np, int mb, const Panels& pn, const Geometry& g, const int8_t* const* xq,
                        const int32_t* const* xc, const float* xs, float* o) {
    bundle_tiles(np, mb, [&](auto MC, auto NC) {
        int8dot<decltype(MC)::value, decltype(NC)::value>(fmt, pn, g, xq, xc, xs, o);
    });
}
#if MOETIER_HAS_DOT
// fp8 on the VBMI kernels: decode (mb <= DECODE_MAX_TOKENS, a whole bundle of np <= 4 panels, split 1
// or 2) or prefill (mb <= DOT_BLOCK, np <= 2, split 1).
inline void fp8_dot(int np, int mb, int split, const Panels& pn, const Geometry& g, const uint16_t* const* xh,
                    const uint16_t* const* xl, float* o) {
    auto go = [&](auto MC, auto NC, auto SC) {
        gemm_fp8dot<decltype(MC)::value, decltype(NC)::value, decltype(SC)::value>(pn, g, xh, xl, o);
    };
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    auto decode = [&](auto MC) {
        auto with_np = [&](auto SC) {
            switch (np) {
                case 1: go(MC, I1{}, SC); break;
                case 2: go(MC, I2{}, SC); break;
                case 3: go(MC, std::integral_constant<int, 3>{}, SC); break;
                default: go(MC, std::integral_constant<int, 4>{}, SC); break;
            }
        };
        if (split == 2) with_np(I2{});
        else with_np(I1{});
    };
    auto prefill = [&](auto MC) {
        if (np == 1) go(MC, I1{}, I1{});
        else go(MC, I2{}, I1{});
    };
    switch (mb) {
        case 1: decode(I1{}); break;
        case 2: decode(I2{}); break;
        case 3: decode(std::integral_constant<int, 3>{}); break;
        case 4: decode(std::integral_constant<int, 4>{}); break;
        case 5: prefill(std::integral_constant<int, 5>{}); break;
        case 6: prefill(std::integral_constant<int, 6>{}); break;
        case 7: prefill(std::integral_constant<int, 7>{}); break;
        default: prefill(std::integral_constant<int, 8>{}); break;
    }
}
// A whole bundle (np <= 4 panels) x mb <= BUNDLE_TOKENS tokens on the vdpbf16ps kernel; split 2 (decode,
// mb <= DECODE_MAX_TOKENS): activations as bf16 hi (xb) + lo (xl) parts.
inline void bf16_bundle(int np, int mb, const Panels& pn, const Geometry& g, const uint16_t* const* xb, float* o,
                        int split = 1, const uint16_t* const* xl = nullptr) {
    if (split == 2) {
        bundle_tiles(np, mb, [&](auto MC, auto NC) {
            if constexpr (decltype(MC)::value <= DECODE_MAX_TOKENS)
                gemm_bf16dot<decltype(MC)::value, decltype(NC)::value, 2>(pn, g, xb, o, xl);
        });
        return;
    }
    bundle_tiles(np, mb, [&](auto MC, auto NC) {
        gemm_bf16dot<decltype(MC)::value, decltype(NC)::value>(pn, g, xb, o);
    });
}
#endif

// fp8/fp16 panels (`np` of `pn`) -> a bf16 pair bundle of np panels at dst (see dequant_bf16_pairs).
inline Panels dequant_panels(const Panels& pn, int np, const Geometry& g, uint8_t* dst) {
#if MOETIER_HAS_DOT
    for (int q = 0; q < np; ++q) {
        if (g.fmt == FP8 && g.fp8_pairs) dequant_fp8_pairs(pn.sub(q), g, dst, np, q);
        else if (g.fmt == FP8) dequant_bf16_pairs<DecFP8, true>(pn.sub(q), g, dst, np, q);
        else dequant_bf16_pairs<DecF16, false>(pn.sub(q), g, dst, np, q);
    }
#else
    (void)pn, (void)g;
#endif
    return {dst, np, 0};
}

// Symmetric per-row int8 quantization. corr[gi] = c * (sum of the codes in columns [gi G, (gi + 1) G)),
// for gi < groups: the offset gemm_int8dot removes (c = 8 for int4, 128 for int8; see there). A zero row
// gets scale 1 and all-zero codes, so it contributes exactly zero.
inline void quantize_row_i8(const float* x, int n, int G, int groups, int c, int8_t* q, float* scale,
                            int32_t* corr) {
    float amax = 0.f;
    bool finite = true;
    for (int i = 0; i < n; ++i) {
        amax = std::max(amax, std::fabs(x[i]));
        finite &= std::isfinite(x[i]);
    }
    if (!finite) {  // nan_policy "propagate": a NaN scale carries the NaN to every output of the row
        std::memset(q, 0, size_t(n));
        std::fill(corr, corr + groups, 0);
        *scale = std::numeric_limits<float>::quiet_NaN();
        return;
    }
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    const float inv = 1.f / s;
    for (int i = 0; i < n; ++i) {
        float v = std::nearbyint(x[i] * inv);
        v = std::min(127.f, std::max(-127.f, v));
        q[i] = int8_t(v);
    }
    for (int gi = 0; gi < groups; ++gi) {
        int32_t sum = 0;
        for (int i = gi * G; i < (gi + 1) * G; ++i) sum += q[i];
        corr[gi] = c * sum;
    }
    *scale = s;
}
// The unsigned-weight offset of a format on the vpdpbusd path (gemm_int8dot); with mins the codes are
// unsigned already and the kernel wants the plain code sums (1).
inline int weight_offset(int fmt) { return fmt == I4 ? 8 : 128; }
inline int weight_offset(const Geometry& g) {
    // split codes without mins are stored q + (8 << hbits): q5_0's q + 16, q6_k's q + 32; q3_k's q + 4
    return g.mins ? 1 : g.e2m1 ? E2M1_OFFSET : g.iq4 ? IQ4_OFFSET : g.crumbs ? 4 : g.hbits ? (8 << g.hbits)
                                                                                  : weight_offset(g.fmt);
}

// One activation row (n values, fp32 or bf16 bits) in the forms the kernels read: fp32 in xf, zero-padded
// to xs columns; when asked (non-null), its bf16 copy xb, the bf16 low part xl = x - bf16(x) (fp8 decode),
// and int8 codes xq with the scale and per-group code sums of quantize_row_i8 for the matrix `g`. Returns
// whether the low part is all zero (x exactly bf16); true when xl is not asked.
inline bool convert_row(const void* src, bool src_bf16, int n, int xs, const Geometry& g, float* xf, uint16_t* xb,
                        uint16_t* xl, int8_t* xq, float* scale, int32_t* corr) {
    if (src_bf16) {
        const uint16_t* h = static_cast<const uint16_t*>(src);
        for (int i = 0; i < n; ++i) xf[i] = bf16_to_f32(h[i]);
    } else {
        std::memcpy(xf, src, size_t(n) * 4);
    }
    std::fill(xf + n, xf + xs, 0.f);
    bool exact = true;
    if (xb) {
        for (int i = 0; i < xs; ++i) xb[i] = f32_to_bf16(xf[i]);
        if (xl) {
            uint16_t any = 0;
            for (int i = 0; i < xs; ++i) any |= xl[i] = f32_to_bf16(xf[i] - bf16_to_f32(xb[i]));
            exact = (any & 0x7FFF) == 0;
        }
    }
    if (xq) quantize_row_i8(xf, xs, g.G, g.Kp / g.G, weight_offset(g), xq, scale, corr);
    return exact;
}

inline void MoELayer::phase_convert(Ctx& c, int t0, int t1) const {
    const size_t row_bytes = size_t(H_) * (c.hidden_bf16 ? 2 : 4);
    for (int t = t0; t < t1; ++t) {
        const int64_t at = int64_t(t) * c.xs;
        const bool exact = convert_row(static_cast<const uint8_t*>(c.hidden) + t * row_bytes, c.hidden_bf16, H_, c.xs,
                                       gu_, c.X + at, c.need_xb ? c.Xb + at : nullptr,
                                       c.need_xl ? c.Xl + at : nullptr, c.need_xq ? c.Xq + at : nullptr,
                                       c.need_xq ? &c.Xscale[t] : nullptr,
                                       c.need_xq ? c.Xcorr + int64_t(t) * c.xgroups : nullptr);
        if (c.need_xl) c.x_exact[t] = exact;
    }
}

inline void MoELayer::phase_gather(Ctx& c, int i0, int i1) const {
    const bool i8 = gu_.fmt == I8;
    for (int i = i0; i < i1; ++i) {
        const int64_t r = c.g_rows[i];
        const int t = c.row_tok[r];
        if (i8) {
            std::memcpy(c.Xg + r * c.xg_stride, c.Xq + int64_t(t) * c.xs, size_t(c.xs));
            c.Xgscale[r] = c.Xscale[t];
        } else {
            std::memcpy(c.Xg + r * c.xg_stride, c.Xb + int64_t(t) * c.xs, size_t(c.xs) * 2);
        }
    }
}

inline void MoELayer::phase_gate_up(Ctx& c, int a, int b0, int b1) const {
    const ExpertSlot& s = *slots_[c.act_slot[a]];
    const int row0 = c.act_row0[a], M = c.act_m[a], path = c.act_path[a], dpath = c.act_dpath[a];
    const bool tiles = is_amx(path);
    const bool decode = M <= DECODE_MAX_TOKENS;
    const int block = tiles ? AMX_TOKENS : path == P_F32 ? F32_BLOCK : DOT_BLOCK;
    const bool bf16_h = bf16_acts(dpath);           // the forms of h the down projection's path reads
    const bool lo_h = split_acts(dpath) && decode;  // the down projection splits h into bf16 hi + lo
    const bool bundle_calls = bundle_path(path, M);
    alignas(64) float o[4 * 32 * PANEL];
    uint8_t* deq = is_deq(path) ? scratch(thread_scratch().deq, size_t(2) * gu_deq_.panel_bytes) : nullptr;
#if MOETIER_HAS_AMX
    amx::TileSession tile_session;
    if (tiles) tile_session.ensure();
#endif
    // act(gate + bias) * (up + bias) for panel p of tokens m0 .. m0 + mb into h (fp32, and bf16 copies).
    auto finish = [&](int p, const float* og, const float* ou, int m0, int mb) {
        for (int m = 0; m < mb; ++m) {
            V gv = vload(og + m * PANEL), uv = vload(ou + m * PANEL), h;
            if (has_bias_) {
                gv = vadd(gv, vload(s.bg.data() + p * PANEL));
                uv = vadd(uv, vload(s.bu.data() + p * PANEL));
            }
            if (act_ == SILU) {
                h = vmul(vmul(gv, vsigmoid(gv)), uv);
            } else {
                // min/max return their second operand when either is NaN: the value goes second so a
                // NaN passes through the clamp, as torch.clamp lets it.
                gv = vmin(vset1(limit_), gv);
                uv = vmax(vset1(-limit_), vmin(vset1(limit_), uv));
                h = vmul(vadd(uv, vset1(1.f)), vmul(gv, vsigmoid(vmul(gv, vset1(alpha_)))));
            }
            const int64_t r = row0 + m0 + m;
            float* hf = c.Hf + r * c.hs + p * PANEL;
            vstore(hf, h);
            if (bf16_h)
                for (int i = 0; i < PANEL; ++i) c.Hb[r * c.hs + p * PANEL + i] = f32_to_bf16(hf[i]);
            if (lo_h)
                for (int i = 0; i < PANEL; ++i) {
                    const int64_t at = r * c.hs + p * PANEL + i;
                    c.Hl[at] = f32_to_bf16(hf[i] - bf16_to_f32(c.Hb[at]));
                }
        }
    };
    for (int b = b0; b < b1; ++b) {
        const Panels bd = gu_bundle(s, b);  // gate/up pairs 2b (panels 0, 1) and 2b + 1 (panels 2, 3)
        if (bundle_calls) {
            // Whole bundles (one sequential stream), up to BUNDLE_TOKENS tokens per call.
            for (int m0 = 0; m0 < M; m0 += BUNDLE_TOKENS) {
                const int mb = std::min(BUNDLE_TOKENS, M - m0);
                if (path == P_F32) {
                    const float* x[F32_BLOCK];
                    for (int m = 0; m < mb; ++m) x[m] = c.X + int64_t(c.row_tok[row0 + m0 + m]) * c.xs;
                    run_f32_np(bd.n, gu_.fmt, mb, bd, gu_, x, o);
                } else {
                    const uint16_t* xh[BUNDLE_TOKENS];
                    const uint16_t* xl[BUNDLE_TOKENS];
                    const int8_t* xq[BUNDLE_TOKENS];
                    const int32_t* xc[BUNDLE_TOKENS];
                    float xsc[BUNDLE_TOKENS];
                    bool exact = true;
                    for (int m = 0; m < mb; ++m) {
                        const int t = c.row_tok[row0 + m0 + m];
                        xh[m] = c.need_xb ? c.Xb + int64_t(t) * c.xs : nullptr;
                        xl[m] = c.need_xl ? c.Xl + int64_t(t) * c.xs : nullptr;
                        if (c.need_xl && decode) exact &= c.x_exact[t] != 0;
                        xq[m] = c.need_xq ? c.Xq + int64_t(t) * c.xs : nullptr;
                        xc[m] = c.need_xq ? c.Xcorr + int64_t(t) * c.xgroups : nullptr;
                        xsc[m] = c.need_xq ? c.Xscale[t] : 0.f;
                    }
                    if (path == P_INT8DOT) int8_decode(gu_.fmt, bd.n, mb, bd, gu_, xq, xc, xsc, o);
#if MOETIER_HAS_DOT
                    else if (path == P_FP8DOT) fp8_dot(bd.n, mb, exact ? 1 : 2, bd, gu_, xh, xl, o);
                    else if (path == P_BF16DOT && decode) bf16_bundle(bd.n, mb, bd, gu_, xh, o, exact ? 1 : 2, xl);
                    else if (path == P_BF16DOT) bf16_bundle(bd.n, mb, bd, gu_, xh, o);
#else
                    (void)xh, (void)xl, (void)exact;
#endif
                }
                for (int j = 0; 2 * j < bd.n; ++j)
                    finish(2 * b + j, o + 2 * j * mb * PANEL, o + (2 * j + 1) * mb * PANEL, m0, mb);
            }
            continue;
        }
        for (int j = 0; 2 * j < bd.n; ++j) {  // prefill: one gate/up pair per call, every token block
            const int p = 2 * b + j;
            Panels pr = bd.sub(2 * j);
            const Geometry* g = &gu_;
            if (deq) {
                pr = dequant_panels(pr, 2, gu_, deq);
                g = &gu_deq_;
            }
            for (int m0 = 0; m0 < M; m0 += block) {
                const int mb = std::min(block, M - m0);
                const int ld = tiles ? AMX_TOKENS : mb;  // rows per panel in o
                if (path == P_F32) {
                    const float* x[F32_BLOCK];
                    for (int m = 0; m < mb; ++m) x[m] = c.X + int64_t(c.row_tok[row0 + m0 + m]) * c.xs;
                    run_f32_fmt<2>(gu_.fmt, mb, pr, gu_, x, o);
                } else if (tiles) {
#if MOETIER_HAS_AMX
                    const uint8_t* xa = c.Xg + int64_t(row0 + m0) * c.xg_stride;
                    if (path == P_AMX_INT8) amx_panels<true>(pr, 2, *g, xa, c.xg_stride, mb, c.Xgscale + row0 + m0, o);
                    else amx_panels<false>(pr, 2, *g, xa, c.xg_stride, mb, nullptr, o);
#endif
                } else {
                    const uint16_t* xb[DOT_BLOCK];
                    const int8_t* xq[DOT_BLOCK];
                    const int32_t* xc[DOT_BLOCK];
                    float xsc[DOT_BLOCK];
                    for (int m = 0; m < mb; ++m) {
                        const int t = c.row_tok[row0 + m0 + m];
                        xb[m] = c.need_xb ? c.Xb + int64_t(t) * c.xs : nullptr;
                        xq[m] = c.need_xq ? c.Xq + int64_t(t) * c.xs : nullptr;
                        xc[m] = c.need_xq ? c.Xcorr + int64_t(t) * c.xgroups : nullptr;
                        xsc[m] = c.need_xq ? c.Xscale[t] : 0.f;
                    }
#if MOETIER_HAS_DOT
                    if (path == P_FP8DOT) fp8_dot(2, mb, 1, pr, *g, xb, nullptr, o);
                    else
#endif
                        run_dot<2>(deq ? P_BF16DOT : path, gu_.fmt, mb, pr, *g, xb, xq, xc, xsc, o);
                }
                finish(p, o, o + ld * PANEL, m0, mb);
            }
        }
    }
    if (b1 == bundles(2 * gu_.panels)) {  // the columns past the last panel are read by the down kernel: zero them
        for (int m = 0; m < M; ++m) {
            const int64_t r = row0 + m;
            std::fill(c.Hf + r * c.hs + gu_.panels * PANEL, c.Hf + (r + 1) * c.hs, 0.f);
            if (bf16_h)
                std::fill(c.Hb + r * c.hs + gu_.panels * PANEL, c.Hb + (r + 1) * c.hs, uint16_t(0));
            if (lo_h) std::fill(c.Hl + r * c.hs + gu_.panels * PANEL, c.Hl + (r + 1) * c.hs, uint16_t(0));
        }
    }
}

inline void MoELayer::phase_quantize_h(Ctx& c, int r0, int r1) const {
    for (int i = r0; i < r1; ++i) {
        const int64_t r = c.q_rows[i];
        quantize_row_i8(c.Hf + r * c.hs, c.hs, dn_.G, c.hgroups, weight_offset(dn_), c.Hq + r * c.hs, &c.Hscale[r],
                        c.Hcorr + r * c.hgroups);
    }
}

inline void MoELayer::write_out(Ctx& c, const float* acc, int t0, int t1, int c0, int c1) const {
    c1 = std::min(c1, H_);
    for (int t = t0; t < t1; ++t) {
        const float* a = acc + int64_t(t) * c.hp;
        if (c.out_bf16) {
            uint16_t* o = static_cast<uint16_t*>(c.out) + int64_t(t) * H_;
            for (int i = c0; i < c1; ++i) o[i] = f32_to_bf16(a[i]);
        } else {
            float* o = static_cast<float*>(c.out) + int64_t(t) * H_;
            std::memcpy(o + c0, a + c0, size_t(c1 - c0) * 4);
        }
    }
}

// Down projection of a decode expert's rows (<= DECODE_MAX_TOKENS), bundles [b0, b1), whole bundles per
// call (one sequential stream), into its rows of Y (+ bias).
inline void MoELayer::phase_down_decode(Ctx& c, int a, int b0, int b1) const {
    const ExpertSlot& s = *slots_[c.act_slot[a]];
    const int row0 = c.act_row0[a], M = c.act_m[a], path = c.act_dpath[a];
    alignas(64) float o[4 * DECODE_MAX_TOKENS * PANEL];
    for (int b = b0; b < b1; ++b) {
        const Panels bd = dn_bundle(s, b);
        if (path == P_F32) {
            const float* x[F32_BLOCK];
            for (int m = 0; m < M; ++m) x[m] = c.Hf + int64_t(row0 + m) * c.hs;
            run_f32_np(bd.n, dn_.fmt, M, bd, dn_, x, o);
        } else if (split_acts(path)) {
#if MOETIER_HAS_DOT
            const uint16_t* xh[DECODE_MAX_TOKENS];
            const uint16_t* xl[DECODE_MAX_TOKENS];
            for (int m = 0; m < M; ++m) {
                xh[m] = c.Hb + int64_t(row0 + m) * c.hs;
                xl[m] = c.Hl + int64_t(row0 + m) * c.hs;
            }
            if (path == P_FP8DOT) fp8_dot(bd.n, M, 2, bd, dn_, xh, xl, o);
            else bf16_bundle(bd.n, M, bd, dn_, xh, o, 2, xl);
#endif
        } else {
            const int8_t* xq[DECODE_MAX_TOKENS];
            const int32_t* xc[DECODE_MAX_TOKENS];
            float xsc[DECODE_MAX_TOKENS];
            for (int m = 0; m < M; ++m) {
                const int64_t r = row0 + m;
                xq[m] = c.Hq + r * c.hs;
                xc[m] = c.Hcorr + r * c.hgroups;
                xsc[m] = c.Hscale[r];
            }
            int8_decode(dn_.fmt, bd.n, M, bd, dn_, xq, xc, xsc, o);
        }
        for (int q = 0; q < bd.n; ++q) {
            const int p = BUNDLE * b + q;
            for (int m = 0; m < M; ++m) {
                V y = vload(o + (q * M + m) * PANEL);
                if (has_bias_) y = vadd(y, vload(s.bd.data() + p * PANEL));
                vstore(c.Y + int64_t(c.row_y[row0 + m]) * c.hp + p * PANEL, y);
            }
        }
    }
}

// Activation rows of one matrix's input in the forms the prefill kernels read, `stride` columns apart: fp32
// (f), bf16 (b), int8 codes (q) with per-group code sums (corr, `groups` per row) and scales; a form the
// path does not use may be null.
struct ActRows {
    const float* f = nullptr;
    const uint16_t* b = nullptr;
    const int8_t* q = nullptr;
    const int32_t* corr = nullptr;
    const float* scale = nullptr;
    int64_t stride = 0;
    int groups = 0;
};

// Rows r0 .. r0 + mb of `a` through the np panels `pr` (`own`: their packed geometry; `g`: the one the
// kernels read, the bf16 one after dequant_panels) on `path` into o[q][m][16], AMX_TOKENS rows per panel
// on the tiles and mb otherwise. `whole`: whole bundles, up to BUNDLE_TOKENS rows per call.
inline void prefill_block(int path, bool whole, int np, int mb, const Panels& pr, const Geometry& own,
                          const Geometry& g, const ActRows& a, int64_t r0, float* o) {
    if (path == P_F32) {
        const float* x[F32_BLOCK];
        for (int m = 0; m < mb; ++m) x[m] = a.f + (r0 + m) * a.stride;
        run_f32_np(np, own.fmt, mb, pr, own, x, o);
    } else if (is_amx(path)) {
#if MOETIER_HAS_AMX
        if (path == P_AMX_INT8)
            amx_panels<true>(pr, np, own, reinterpret_cast<const uint8_t*>(a.q + r0 * a.stride), a.stride, mb,
                             a.scale + r0, o);
        else
            amx_panels<false>(pr, np, g, reinterpret_cast<const uint8_t*>(a.b + r0 * a.stride), a.stride * 2, mb,
                              nullptr, o);
#endif
    } else {
        const uint16_t* xb[DOT_BLOCK];
        const int8_t* xq[DOT_BLOCK];
        const int32_t* xc[DOT_BLOCK];
        float xsc[DOT_BLOCK];
        const bool i8 = path == P_INT8DOT;
        for (int m = 0; m < mb; ++m) {
            const int64_t r = r0 + m;
            xb[m] = i8 ? nullptr : a.b + r * a.stride;
            xq[m] = i8 ? a.q + r * a.stride : nullptr;
            xc[m] = i8 ? a.corr + r * a.groups : nullptr;
            xsc[m] = i8 ? a.scale[r] : 0.f;
        }
        const int kp = path == P_DEQDOT ? P_BF16DOT : path;
#if MOETIER_HAS_DOT
        if (path == P_FP8DOT) return fp8_dot(np, mb, 1, pr, g, xb, nullptr, o);
        if (whole && path == P_BF16DOT) return bf16_bundle(np, mb, pr, g, xb, o);
#endif
        if (whole) int8_decode(own.fmt, np, mb, pr, g, xq, xc, xsc, o);
        else if (np == 2) run_dot<2>(kp, own.fmt, mb, pr, g, xb, xq, xc, xsc, o);
        else run_dot<1>(kp, own.fmt, mb, pr, g, xb, xq, xc, xsc, o);
    }
}

// Down projection of the prefill experts of `node`, output panels [p0, p1) (whole bundles), every token:
// acc = sum over the experts in id order of w * (down h + bias). No other task writes these elements.
inline void MoELayer::phase_down(Ctx& c, int node, int p0, int p1) const {
    float* acc = c.acc + int64_t(node) * c.T * c.hp;
    for (int t = 0; t < c.T; ++t) std::fill(acc + int64_t(t) * c.hp + p0 * PANEL, acc + int64_t(t) * c.hp + p1 * PANEL, 0.f);
    alignas(64) float o[4 * 32 * PANEL];
#if MOETIER_HAS_AMX
    amx::TileSession tile_session;
#endif
    ActRows h;  // the intermediate rows of every expert
    h.f = c.Hf, h.b = c.Hb, h.q = c.Hq, h.corr = c.Hcorr, h.scale = c.Hscale, h.stride = c.hs, h.groups = c.hgroups;
    for (int a : c.node_prefill[node]) {
        const ExpertSlot& s = *slots_[c.act_slot[a]];
        const int row0 = c.act_row0[a], M = c.act_m[a], path = c.act_dpath[a];
        const bool tiles = is_amx(path);
        const bool whole = bundle_path(path, M);  // whole bundles, BUNDLE_TOKENS tokens per call
        const int block = whole ? BUNDLE_TOKENS : tiles ? AMX_TOKENS : path == P_F32 ? F32_BLOCK : DOT_BLOCK;
#if MOETIER_HAS_AMX
        if (tiles) tile_session.ensure();
#endif
        for (int p = p0, np = 0; p < p1; p += np) {
            const Panels bd = dn_bundle(s, p / BUNDLE);
            const int q0 = p % BUNDLE;
            np = whole ? bd.n - q0 : std::min(2, bd.n - q0);
            Panels pr = bd.sub(q0);
            const Geometry* g = &dn_;
            if (is_deq(path)) {
                pr = dequant_panels(pr, np, dn_, scratch(thread_scratch().deq, size_t(2) * dn_deq_.panel_bytes));
                g = &dn_deq_;
            }
            for (int m0 = 0; m0 < M; m0 += block) {
                const int mb = std::min(block, M - m0);
                const int ld = tiles ? AMX_TOKENS : mb;  // rows per panel in o
                prefill_block(path, whole, np, mb, pr, dn_, *g, h, row0 + m0, o);
                for (int q = 0; q < np; ++q)
                    for (int m = 0; m < mb; ++m) {
                        const int r = row0 + m0 + m;
                        V y = vload(o + (q * ld + m) * PANEL);
                        if (has_bias_) y = vadd(y, vload(s.bd.data() + (p + q) * PANEL));
                        float* dst = acc + int64_t(c.row_tok[r]) * c.hp + (p + q) * PANEL;
                        vstore(dst, vfma(y, vset1(c.row_w[r]), vload(dst)));
                    }
            }
        }
    }
    if (c.active_nodes.size() == 1 && !c.any_decode) write_out(c, acc, 0, c.T, p0 * PANEL, p1 * PANEL);
}

// Tokens [t0, t1): the prefill sums of every node (summed into node 0's buffer), then the token's decode
// rows in expert-id order (w * Y), then the output.
inline void MoELayer::phase_reduce(Ctx& c, int t0, int t1) const {
    float* a0 = c.acc;
    for (int t = t0; t < t1; ++t) {
        float* dst = a0 + int64_t(t) * c.hp;
        if (c.active_nodes.empty()) {
            std::fill(dst, dst + c.hp, 0.f);
        } else {
            const int n0 = c.active_nodes[0];
            if (n0 != 0) std::memcpy(dst, c.acc + (int64_t(n0) * c.T + t) * c.hp, size_t(c.hp) * 4);
            for (size_t i = 1; i < c.active_nodes.size(); ++i) {
                const float* src = c.acc + (int64_t(c.active_nodes[i]) * c.T + t) * c.hp;
                for (int j = 0; j < c.hp; ++j) dst[j] += src[j];
            }
        }
        for (int i = c.tok_ystart[t]; i < c.tok_ystart[t + 1]; ++i) {
            const int r = c.tok_yrows[i];
            const float* y = c.Y + int64_t(c.row_y[r]) * c.hp;
            const V w = vset1(c.row_w[r]);
            for (int j = 0; j < c.hp; j += PANEL) vstore(dst + j, vfma(vload(y + j), w, vload(dst + j)));
        }
    }
    write_out(c, a0, t0, t1, 0, H_);
}

inline void MoELayer::forward(ThreadPool& pool, const void* hidden, bool hidden_bf16, int T, int K,
                              const int64_t* ids, const float* w, void* out, bool out_bf16) const {
    Ctx c;
    c.T = T;
    c.hidden = hidden;
    c.hidden_bf16 = hidden_bf16;
    c.out = out;
    c.out_bf16 = out_bf16;
    const int num_nodes = pool.num_nodes();
    // ---- routing (counting sort by slot; rows keep token order inside an expert) ----
    std::vector<int> count(slots_.size(), 0);
    for (int64_t i = 0; i < int64_t(T) * K; ++i) {
        const int64_t e = ids[i];
        if (e < 0 || e >= num_experts_) throw std::out_of_range("expert id out of range");
        const int s = slot_of_[e];
        if (s >= 0) ++count[s];
    }
    std::vector<int> order;
    for (int s = 0; s < int(slots_.size()); ++s)
        if (count[s]) order.push_back(s);
    std::sort(order.begin(), order.end(), [&](int x, int y) { return slots_[x]->id < slots_[y]->id; });
    std::vector<int> fill_pos(slots_.size(), 0);
    int R = 0;
    for (int s : order) {
        c.act_slot.push_back(s);
        c.act_row0.push_back(R);
        c.act_m.push_back(count[s]);
        fill_pos[s] = R;
        const bool prefill = count[s] > DECODE_MAX_TOKENS;
        const int path = choose_path(gu_, prefill, std::min(H_, I_), int8_acts_, gu_.fp8_pairs);
        const int dpath = choose_path(dn_, prefill, std::min(H_, I_), int8_acts_, dn_.fp8_pairs);
        c.act_path.push_back(path);
        c.act_dpath.push_back(dpath);
        c.need_xb |= bf16_acts(path);
        c.need_xq |= i8_acts(path);
        c.need_xl |= split_acts(path) && !prefill;
        c.need_hl |= split_acts(dpath) && !prefill;
        R += count[s];
    }
    c.row_tok.resize(R);
    c.row_w.resize(R);
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < K; ++j) {
            const int s = slot_of_[ids[int64_t(t) * K + j]];
            if (s < 0) continue;
            const int r = fill_pos[s]++;
            c.row_tok[r] = t;
            c.row_w[r] = w[int64_t(t) * K + j];
        }
    // Decode experts: rows in Y and per-token lists (rows ascend with expert id); prefill experts per node.
    c.node_prefill.assign(num_nodes, {});
    c.row_y.assign(R, -1);
    int Y_rows = 0;
    for (int a = 0; a < int(c.act_slot.size()); ++a) {
        if (c.act_m[a] <= DECODE_MAX_TOKENS) {
            for (int m = 0; m < c.act_m[a]; ++m) c.row_y[c.act_row0[a] + m] = Y_rows++;
        } else {
            c.node_prefill[std::min(slots_[c.act_slot[a]]->node, num_nodes - 1)].push_back(a);
        }
    }
    c.any_decode = Y_rows > 0;
    for (int nd = 0; nd < num_nodes; ++nd)
        if (!c.node_prefill[nd].empty()) c.active_nodes.push_back(nd);
    c.tok_ystart.assign(T + 1, 0);
    for (int r = 0; r < R; ++r)
        if (c.row_y[r] >= 0) ++c.tok_ystart[c.row_tok[r] + 1];
    for (int t = 0; t < T; ++t) c.tok_ystart[t + 1] += c.tok_ystart[t];
    c.tok_yrows.resize(Y_rows);
    {
        std::vector<int> pos(c.tok_ystart.begin(), c.tok_ystart.end() - 1);
        for (int r = 0; r < R; ++r)
            if (c.row_y[r] >= 0) c.tok_yrows[pos[c.row_tok[r]]++] = r;
    }
    // ---- buffers ----
    bool any_tiles = false;
    for (size_t a = 0; a < c.act_path.size(); ++a) any_tiles |= is_amx(c.act_path[a]) || is_amx(c.act_dpath[a]);
    c.xs = gu_.Kp;
    c.hs = std::max<int>(dn_.Kp, gu_.panels * PANEL);
    if (any_tiles) {
        // A tiles read whole 64-byte column blocks: pad the rows with zero columns. 64 more keep a
        // tile's 16 rows off one L1 set (a 4 KiB row stride would alias them all: hidden 2048 in bf16).
        c.xs = int(round_up(c.xs, 64)) + 64;
        c.hs = int(round_up(c.hs, 64)) + 64;
    }
    // Tile loads read up to AMX_TOKENS rows past an expert's last row: allocate them (never used).
    const int R_alloc = R + (any_tiles ? TILE_ROW_PAD : 0);
    c.hp = dn_.panels * PANEL;
    if (R == 0) {  // nothing held is routed to: zeros
        if (out_bf16) std::memset(out, 0, size_t(T) * H_ * 2);
        else std::memset(out, 0, size_t(T) * H_ * 4);
        return;
    }
    Scratch& sc = thread_scratch();
    c.X = scratch(sc.X, size_t(T) * c.xs);
    if (c.need_xb) c.Xb = scratch(sc.Xb, size_t(T) * c.xs);
    if (c.need_xl) {
        c.Xl = scratch(sc.Xl, size_t(T) * c.xs);
        c.x_exact.assign(T, 0);
    }
    c.xgroups = gu_.Kp / gu_.G;
    c.hgroups = dn_.Kp / dn_.G;
    if (c.need_xq) {
        c.Xq = scratch(sc.Xq, size_t(T) * c.xs);
        c.Xscale = scratch(sc.Xscale, size_t(T));
        c.Xcorr = scratch(sc.Xcorr, size_t(T) * c.xgroups);
    }
    c.Hf = scratch(sc.Hf, size_t(R) * c.hs);
    bool need_hb = false;
    for (size_t a = 0; a < c.act_slot.size(); ++a) {
        need_hb |= bf16_acts(c.act_dpath[a]);
        if (i8_acts(c.act_dpath[a]))
            for (int m = 0; m < c.act_m[a]; ++m) c.q_rows.push_back(c.act_row0[a] + m);
        if (is_amx(c.act_path[a]))
            for (int m = 0; m < c.act_m[a]; ++m) c.g_rows.push_back(c.act_row0[a] + m);
    }
    if (need_hb) c.Hb = scratch(sc.Hb, size_t(R_alloc) * c.hs);
    if (c.need_hl) c.Hl = scratch(sc.Hl, size_t(R_alloc) * c.hs);
    if (!c.q_rows.empty()) {
        c.Hq = scratch(sc.Hq, size_t(R_alloc) * c.hs);
        c.Hscale = scratch(sc.Hscale, size_t(R_alloc));
        c.Hcorr = scratch(sc.Hcorr, size_t(R_alloc) * c.hgroups);
    }
    if (!c.g_rows.empty()) {
        c.xg_stride = int64_t(c.xs) * (gu_.fmt == I8 ? 1 : 2);
        c.Xg = scratch(sc.Xg, size_t(R_alloc) * c.xg_stride);
        if (gu_.fmt == I8) c.Xgscale = scratch(sc.Xgscale, size_t(R_alloc));
    }
    c.acc = scratch(sc.acc, size_t(num_nodes) * T * c.hp);
    if (c.any_decode) c.Y = scratch(sc.Y, size_t(Y_rows) * c.hp);
    // ---- task lists ----
    constexpr int CONVERT_CHUNK = 4, QUANT_CHUNK = 2, GATHER_CHUNK = 16;
    // Prefill down tasks loop over every prefill expert, each streaming its slice of panels: longer
    // slices keep the hardware prefetcher on one stream longer; ~8 tasks per thread still balance the load.
    const int dn_chunk = int(round_up(
        std::max(DN_CHUNK_MIN, std::min(DN_CHUNK_MAX, dn_.panels / (8 * pool.size()))), BUNDLE));
    const int gu_bundles = bundles(2 * gu_.panels), dn_bundles = bundles(dn_.panels);
    // Decode experts: runs of whole bundles of about DECODE_RUN_BYTES each.
    const int gu_run = int(std::max<int64_t>(1, DECODE_RUN_BYTES / (BUNDLE * gu_.panel_bytes)));
    const int dn_run = int(std::max<int64_t>(1, DECODE_RUN_BYTES / (BUNDLE * dn_.panel_bytes)));
    std::vector<std::unique_ptr<TaskQueue>> gu_tasks, dn_tasks, dd_tasks;
    for (int nd = 0; nd < num_nodes; ++nd) {
        gu_tasks.push_back(std::make_unique<TaskQueue>());
        dn_tasks.push_back(std::make_unique<TaskQueue>());
        dd_tasks.push_back(std::make_unique<TaskQueue>());
    }
    for (int a = 0; a < int(c.act_slot.size()); ++a) {
        const int nd = std::min(slots_[c.act_slot[a]]->node, num_nodes - 1);
        const bool decode = c.act_m[a] <= DECODE_MAX_TOKENS;
        const int run = decode ? gu_run : GU_PREFILL_BUNDLES;
        for (int b = 0; b < gu_bundles; b += run) gu_tasks[nd]->items.push_back({a, b, std::min(gu_bundles, b + run)});
        if (decode)
            for (int b = 0; b < dn_bundles; b += dn_run)
                dd_tasks[nd]->items.push_back({a, b, std::min(dn_bundles, b + dn_run)});
    }
    for (int nd = 0; nd < num_nodes; ++nd)
        if (!c.node_prefill[nd].empty())
            for (int p = 0; p < dn_.panels; p += dn_chunk)
                dn_tasks[nd]->items.push_back({nd, p, std::min(dn_.panels, p + dn_chunk)});
    // Phases are ordered by counting finished work, not by waiting for every thread: a worker the OS
    // descheduled (another process on its core) finds the work taken by the others when it comes back
    // and falls through, instead of holding everyone at a barrier.
    std::atomic<int> convert_next{0}, gather_next{0}, quant_next{0}, reduce_next{0};
    std::atomic<int> convert_done{0}, gather_done{0}, gu_done{0}, quant_done{0}, dn_done{0}, reduce_done{0};
    const int g_total = int(c.g_rows.size());
    int gu_total = 0, dn_total = 0;
    for (int nd = 0; nd < num_nodes; ++nd) {
        gu_total += int(gu_tasks[nd]->items.size());
        dn_total += int(dn_tasks[nd]->items.size()) + int(dd_tasks[nd]->items.size());
    }
    const int q_total = int(c.q_rows.size());
    const bool reduce = c.active_nodes.size() > 1 || c.any_decode;
    // Take tasks from the worker's own node first, then help the other nodes.
    auto drain = [&](std::vector<std::unique_ptr<TaskQueue>>& qs, int worker, std::atomic<int>& done, auto&& fn) {
        const int home = pool.node_of(worker) % num_nodes;
        for (int i = 0; i < num_nodes; ++i) {
            TaskQueue& q = *qs[(home + i) % num_nodes];
            for (int idx; (idx = q.next.fetch_add(1, std::memory_order_relaxed)) < int(q.items.size());) {
                fn(q.items[idx]);
                done.fetch_add(1, std::memory_order_release);
            }
        }
    };
    auto chunks = [](std::atomic<int>& next, std::atomic<int>& done, int total, int chunk, auto&& fn) {
        for (int i; (i = next.fetch_add(chunk, std::memory_order_relaxed)) < total;) {
            const int e = std::min(total, i + chunk);
            fn(i, e);
            done.fetch_add(e - i, std::memory_order_release);
        }
    };
    const std::function<void(int)> job = [&](int worker) {
        chunks(convert_next, convert_done, T, CONVERT_CHUNK, [&](int a, int b) { phase_convert(c, a, b); });
        wait_count(convert_done, T);
        chunks(gather_next, gather_done, g_total, GATHER_CHUNK, [&](int a, int b) { phase_gather(c, a, b); });
        wait_count(gather_done, g_total);
        drain(gu_tasks, worker, gu_done, [&](const std::array<int, 3>& t) { phase_gate_up(c, t[0], t[1], t[2]); });
        wait_count(gu_done, gu_total);
        chunks(quant_next, quant_done, q_total, QUANT_CHUNK, [&](int a, int b) { phase_quantize_h(c, a, b); });
        wait_count(quant_done, q_total);
        drain(dd_tasks, worker, dn_done, [&](const std::array<int, 3>& t) { phase_down_decode(c, t[0], t[1], t[2]); });
        drain(dn_tasks, worker, dn_done, [&](const std::array<int, 3>& t) { phase_down(c, t[0], t[1], t[2]); });
        if (reduce) {
            wait_count(dn_done, dn_total);
            chunks(reduce_next, reduce_done, T, CONVERT_CHUNK, [&](int a, int b) { phase_reduce(c, a, b); });
        }
    };
    pool.run(job);
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
