// One dense weight matrix W [N out, K in] (an attention projection, a dense MLP matrix, the LM head) in
// the experts' packed layout (packed_format.h), and y = x W^T + b over T tokens on the experts' kernels.
//
// Decode (T <= DECODE_MAX_TOKENS) is what a dense layer costs per generated token: every weight byte is
// read once, so tasks stream runs of whole bundles (one sequential stream each, DECODE_RUN_BYTES long),
// every task computing all T tokens of its panels. Prefill tasks take a slice of panels and loop over all
// tokens in blocks, so the slice's weights come from L2 after the first block. Each output element is
// written by exactly one task, in a fixed order of additions: results do not depend on the thread count.
//
// A grouped matrix (groups G > 1) is block-diagonal: rows [g N/G, (g+1) N/G) multiply x's columns
// [g K, (g+1) K), x [T, G K] -> y [T, N] (multi-head latent attention's per-head W_kb / W_vb in decode).
// It runs on the decode kernels at any T: each bundle meets the rows of x of the (at most BUNDLE) groups
// its panels belong to, as if they were tokens.
#pragma once
#include "moe_layer.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

class DenseLinear {
   public:
    DenseLinear(int N, int K, MatFormat fmt, bool has_bias, bool int8_activations, bool fp8_vbmi = true,
                int groups = 1)
        : g_(fmt, N, K), deq_(MatFormat{BF16}, N, g_.Kp), has_bias_(has_bias), int8_acts_(int8_activations),
          groups_(groups) {
        // Whole panels per group: a panel's rows then share one row of x.
        if (groups < 1 || N % groups != 0 || (groups > 1 && (N / groups) % PANEL != 0))
            throw std::invalid_argument("groups must divide out_features into blocks of a multiple of 16 rows");
#if MOETIER_HAS_DOT
        fp8_vbmi_ = fmt.fmt == FP8 && fp8_vbmi && cpu_has_vbmi();
#else
        (void)fp8_vbmi;
#endif
        g_.fp8_pairs = fp8_vbmi_;
    }
    DenseLinear(const DenseLinear&) = delete;
    DenseLinear& operator=(const DenseLinear&) = delete;

    const Geometry& geometry() const { return g_; }
    int64_t bytes() const { return g_.bytes(); }
    bool packed() const { return mem_ != nullptr; }
    bool fp8_vbmi() const { return fp8_vbmi_; }
    int groups() const { return groups_; }
    int64_t in_width() const { return int64_t(g_.K) * groups_; }  // columns of x

    // W in the reference storage (see PanelSource), its scales (or null), bias fp32 [N] (or null). Once.
    void pack(const uint8_t* data, const float* scales, const float* bias) {
        if (mem_) throw std::invalid_argument("the matrix is already packed");
        arena_.expect(size_t(g_.bytes()));  // exactly this matrix
        uint8_t* mem = arena_.allocate(size_t(g_.bytes()), 0, 1);
        std::vector<PanelSource> src(g_.panels);
        for (int p = 0; p < g_.panels; ++p) src[p] = {data, scales, p};
        pack_panels(g_, g_.panels, src.data(), mem);
        bias_.assign(size_t(g_.panels) * PANEL, 0.f);
        if (has_bias_ && bias) std::copy(bias, bias + g_.N, bias_.begin());
        mem_ = mem;
    }

    // x [T, K G] fp32 or bf16 bits; out [T, N] fp32 or bf16 bits, fully overwritten.
    void forward(ThreadPool& pool, const void* x, bool x_bf16, int T, void* out, bool out_bf16) const {
        if (groups_ > 1) return forward_grouped(pool, x, x_bf16, T, out, out_bf16);
        const DenseLinear* self = this;
        forward_many(pool, 1, &self, x, x_bf16, T, &out, out_bf16);
    }
    // Several matrices of one input width, format and kernel path (a layer's q, k and v) on the same x,
    // in one call: x converted once, every matrix's panels in one task list (one pool dispatch, not n).
    static void forward_many(ThreadPool& pool, int n, const DenseLinear* const* mats, const void* x, bool x_bf16,
                             int T, void* const* outs, bool out_bf16);
    // Whether `other` reads the same forms of the same x for T tokens (forward_many's requirement).
    bool shares_input(const DenseLinear& other, int T) const {
        return g_.K == other.g_.K && g_.Kp == other.g_.Kp && g_.G == other.g_.G && g_.fmt == other.g_.fmt &&
               groups_ == 1 && other.groups_ == 1 && path_for(T) == other.path_for(T);
    }

   private:
    Geometry g_, deq_;  // deq_: fp8/fp16 panels dequantized to bf16 pairs (prefill)
    bool has_bias_, int8_acts_;
    int groups_;
    bool fp8_vbmi_ = false;
    uint8_t* mem_ = nullptr;
    std::vector<float> bias_;  // zero-padded to whole panels (zeros without a bias)
    ExpertArena arena_;

    int path_for(int T) const { return choose_path(g_, T > DECODE_MAX_TOKENS, g_.K, int8_acts_, fp8_vbmi_); }

    struct Acts {  // the activations in the forms the path's kernels read, rows of xs columns
        int T = 0, xs = 0, groups = 0;
        bool need_xb = false, need_xl = false, need_xq = false;
        float *X = nullptr, *Xscale = nullptr;
        uint16_t *Xb = nullptr, *Xl = nullptr;
        int8_t* Xq = nullptr;
        int32_t* Xcorr = nullptr;
        std::vector<uint8_t> exact;  // per token: x is exactly bf16 (Xl is zero)
    };
    // The activations of `rows` rows of x in the forms `path` reads (the calling thread's scratch).
    static Acts prepare_acts(const Geometry& g, int rows, int path, bool decode);
    // Tasks (matrix, first, end) streaming matrix i's bundles in runs (decode).
    static void decode_tasks(const DenseLinear& d, int i, int workers, std::vector<std::array<int, 3>>& tasks);
    void convert(Acts& a, const void* x, bool x_bf16, int t0, int t1) const;
    // One bundle for the M rows `rows` of x: o [panel][m][PANEL].
    void bundle_decode(const Acts& a, int path, const Panels& bd, const int* rows, int M, float* o) const;
    void panels_decode(const Acts& a, int path, int b0, int b1, void* out, bool out_bf16) const;
    void panels_grouped(const Acts& a, int path, int b0, int b1, int T, void* out, bool out_bf16) const;
    void panels_prefill(const Acts& a, int path, int p0, int p1, void* out, bool out_bf16) const;
    void forward_grouped(ThreadPool& pool, const void* x, bool x_bf16, int T, void* out, bool out_bf16) const;
    // One panel's outputs y (PANEL values, at output column c0) + bias into row `row` of out.
    void write_panel(const float* y, int c0, int64_t row, void* out, bool out_bf16) const {
        const int c1 = std::min(g_.N, c0 + PANEL);
        alignas(64) float v[PANEL];
        vstore(v, vadd(vload(y), vload(bias_.data() + c0)));
        const int64_t at = row * g_.N + c0;
        if (out_bf16) {
            uint16_t* dst = static_cast<uint16_t*>(out) + at;
            for (int i = 0; i < c1 - c0; ++i) dst[i] = f32_to_bf16(v[i]);
        } else {
            std::memcpy(static_cast<float*>(out) + at, v, size_t(c1 - c0) * 4);
        }
    }
    // Rows m of o (panel q of the call at output panel p + q, ld rows per panel) + bias into out.
    void write(const float* o, int ld, int np, int p, int t0, int mb, void* out, bool out_bf16) const {
        for (int q = 0; q < np; ++q) {
            const int c0 = (p + q) * PANEL;
            if (c0 >= g_.N) break;
            for (int m = 0; m < mb; ++m) write_panel(o + (int64_t(q) * ld + m) * PANEL, c0, t0 + m, out, out_bf16);
        }
    }
    Panels bundle_at(int b) const { return bundle(mem_, g_, g_.panels, b); }
};

inline void DenseLinear::convert(Acts& a, const void* x, bool x_bf16, int t0, int t1) const {
    const size_t row_bytes = size_t(g_.K) * (x_bf16 ? 2 : 4);
    for (int t = t0; t < t1; ++t) {
        const int64_t at = int64_t(t) * a.xs;
        const bool exact = convert_row(static_cast<const uint8_t*>(x) + t * row_bytes, x_bf16, g_.K, a.xs, g_,
                                       a.X + at, a.need_xb ? a.Xb + at : nullptr, a.need_xl ? a.Xl + at : nullptr,
                                       a.need_xq ? a.Xq + at : nullptr, a.need_xq ? &a.Xscale[t] : nullptr,
                                       a.need_xq ? a.Xcorr + int64_t(t) * a.groups : nullptr);
        if (a.need_xl) a.exact[t] = exact;
    }
}

inline void DenseLinear::bundle_decode(const Acts& a, int path, const Panels& bd, const int* rows, int M,
                                      float* o) const {
    if (path == P_F32) {
        const float* xp[F32_BLOCK];
        for (int m = 0; m < M; ++m) xp[m] = a.X + int64_t(rows[m]) * a.xs;
        run_f32_np(bd.n, g_.fmt, M, bd, g_, xp, o);
        return;
    }
    if (split_acts(path)) {
#if MOETIER_HAS_DOT
        const uint16_t* xh[DECODE_MAX_TOKENS];
        const uint16_t* xl[DECODE_MAX_TOKENS];
        bool exact = true;
        for (int m = 0; m < M; ++m) {
            xh[m] = a.Xb + int64_t(rows[m]) * a.xs;
            xl[m] = a.Xl + int64_t(rows[m]) * a.xs;
            exact &= a.exact[rows[m]] != 0;
        }
        if (path == P_FP8DOT) fp8_dot(bd.n, M, exact ? 1 : 2, bd, g_, xh, xl, o);
        else bf16_bundle(bd.n, M, bd, g_, xh, o, exact ? 1 : 2, xl);
#endif
    } else {
        const int8_t* xq[DECODE_MAX_TOKENS];
        const int32_t* xc[DECODE_MAX_TOKENS];
        float xsc[DECODE_MAX_TOKENS];
        for (int m = 0; m < M; ++m) {
            xq[m] = a.Xq + int64_t(rows[m]) * a.xs;
            xc[m] = a.Xcorr + int64_t(rows[m]) * a.groups;
            xsc[m] = a.Xscale[rows[m]];
        }
        int8_decode(g_.fmt, bd.n, M, bd, g_, xq, xc, xsc, o);
    }
}

// Bundles [b0, b1), whole bundles per call, all T (<= DECODE_MAX_TOKENS) tokens.
inline void DenseLinear::panels_decode(const Acts& a, int path, int b0, int b1, void* out, bool out_bf16) const {
    alignas(64) float o[BUNDLE * DECODE_MAX_TOKENS * PANEL];
    const int rows[DECODE_MAX_TOKENS] = {0, 1, 2, 3};
    static_assert(DECODE_MAX_TOKENS == 4, "rows lists the decode tokens");
    for (int b = b0; b < b1; ++b) {
        const Panels bd = bundle_at(b);
        bundle_decode(a, path, bd, rows, a.T, o);
        write(o, a.T, bd.n, BUNDLE * b, 0, a.T, out, out_bf16);
    }
}

// Bundles [b0, b1) of a grouped matrix for T tokens (x rows t G + g): a bundle's panels belong to at most
// BUNDLE groups (whole panels per group), whose rows of x it meets as a decode call's tokens.
inline void DenseLinear::panels_grouped(const Acts& a, int path, int b0, int b1, int T, void* out,
                                       bool out_bf16) const {
    static_assert(BUNDLE <= DECODE_MAX_TOKENS, "a bundle's groups are one decode call's tokens");
    alignas(64) float o[BUNDLE * DECODE_MAX_TOKENS * PANEL];
    const int per_group = g_.N / groups_;
    int rows[DECODE_MAX_TOKENS];
    for (int b = b0; b < b1; ++b) {
        const Panels bd = bundle_at(b);
        const int r0 = BUNDLE * b * PANEL;
        const int g0 = r0 / per_group, g1 = std::min(groups_ - 1, (r0 + bd.n * PANEL - 1) / per_group);
        const int M = g1 - g0 + 1;
        for (int t = 0; t < T; ++t) {
            for (int m = 0; m < M; ++m) rows[m] = t * groups_ + g0 + m;
            bundle_decode(a, path, bd, rows, M, o);
            for (int q = 0; q < bd.n; ++q) {
                const int c0 = r0 + q * PANEL;
                if (c0 >= g_.N) break;
                write_panel(o + (int64_t(q) * M + (c0 / per_group - g0)) * PANEL, c0, t, out, out_bf16);
            }
        }
    }
}

// Output panels [p0, p1) (whole bundles), every token: the experts' prefill down loop for one matrix.
inline void DenseLinear::panels_prefill(const Acts& a, int path, int p0, int p1, void* out, bool out_bf16) const {
    alignas(64) float o[4 * 32 * PANEL];
    const bool tiles = is_amx(path);
    const bool whole = bundle_path(path, a.T);
    const int block = whole ? BUNDLE_TOKENS : tiles ? AMX_TOKENS : path == P_F32 ? F32_BLOCK : DOT_BLOCK;
#if MOETIER_HAS_AMX
    amx::TileSession tile_session;
    if (tiles) tile_session.ensure();
#endif
    ActRows rows;
    rows.f = a.X, rows.b = a.Xb, rows.q = a.Xq, rows.corr = a.Xcorr, rows.scale = a.Xscale, rows.stride = a.xs;
    rows.groups = a.groups;
    for (int p = p0, np = 0; p < p1; p += np) {
        const Panels bd = bundle_at(p / BUNDLE);
        const int q0 = p % BUNDLE;
        np = whole ? bd.n - q0 : std::min(2, bd.n - q0);
        Panels pr = bd.sub(q0);
        const Geometry* g = &g_;
        if (is_deq(path)) {
            pr = dequant_panels(pr, np, g_, scratch(thread_scratch().deq, size_t(2) * deq_.panel_bytes));
            g = &deq_;
        }
        for (int m0 = 0; m0 < a.T; m0 += block) {
            const int mb = std::min(block, a.T - m0);
            const int ld = tiles ? AMX_TOKENS : mb;  // rows per panel in o
            prefill_block(path, whole, np, mb, pr, g_, *g, rows, m0, o);
            write(o, ld, np, p, m0, mb, out, out_bf16);
        }
    }
}

inline DenseLinear::Acts DenseLinear::prepare_acts(const Geometry& g, int rows, int path, bool decode) {
    const bool tiles = is_amx(path);
    Acts a;
    a.T = rows;
    a.xs = g.Kp;
    // A tiles read whole 64-byte column blocks; 64 more keep a tile's rows off one L1 set (as the experts).
    if (tiles) a.xs = int(round_up(a.xs, 64)) + 64;
    a.groups = g.Kp / g.G;
    a.need_xb = bf16_acts(path);
    a.need_xl = split_acts(path) && decode;
    a.need_xq = i8_acts(path);
    const size_t n = size_t(rows) + (tiles ? TILE_ROW_PAD : 0);  // tile loads read past the last token
    Scratch& sc = thread_scratch();
    a.X = scratch(sc.X, n * a.xs);
    if (a.need_xb) a.Xb = scratch(sc.Xb, n * a.xs);
    if (a.need_xl) {
        a.Xl = scratch(sc.Xl, n * a.xs);
        a.exact.assign(rows, 0);
    }
    if (a.need_xq) {
        a.Xq = scratch(sc.Xq, n * a.xs);
        a.Xscale = scratch(sc.Xscale, n);
        a.Xcorr = scratch(sc.Xcorr, n * a.groups);
    }
    return a;
}

inline void DenseLinear::decode_tasks(const DenseLinear& d, int i, int workers,
                                      std::vector<std::array<int, 3>>& tasks) {
    const int nb = bundles(d.g_.panels);
    const int run = int(std::max<int64_t>(1, DECODE_RUN_BYTES / (BUNDLE * d.g_.panel_bytes)));
    // At least two runs per worker, so a descheduled worker's share is picked up by the others.
    const int per = std::max(1, std::min(run, nb / (2 * workers)));
    for (int b = 0; b < nb; b += per) tasks.push_back({i, b, std::min(nb, b + per)});
}

inline void DenseLinear::forward_many(ThreadPool& pool, int n, const DenseLinear* const* mats, const void* x,
                                      bool x_bf16, int T, void* const* outs, bool out_bf16) {
    if (n <= 0 || T <= 0) return;
    const DenseLinear& d0 = *mats[0];
    for (int i = 0; i < n; ++i) {
        if (!mats[i]->mem_) throw std::logic_error("the matrix is not packed");
        if (!d0.shares_input(*mats[i], T))
            throw std::invalid_argument("forward_many: the matrices differ in input width, format or kernel path");
    }
    const int path = d0.path_for(T);
    const bool decode = T <= DECODE_MAX_TOKENS;
    Acts a = prepare_acts(d0.g_, T, path, decode);
    constexpr int CONVERT_CHUNK = 4;
    std::vector<std::array<int, 3>> tasks;  // (matrix, first, end): bundles (decode) or panels (prefill)
    for (int i = 0; i < n; ++i) {
        const DenseLinear& d = *mats[i];
        if (decode) {
            decode_tasks(d, i, pool.size(), tasks);
        } else {
            const int chunk = int(round_up(
                std::max(DN_CHUNK_MIN, std::min(DN_CHUNK_MAX, d.g_.panels / (8 * pool.size()))), BUNDLE));
            for (int p = 0; p < d.g_.panels; p += chunk) tasks.push_back({i, p, std::min(d.g_.panels, p + chunk)});
        }
    }
    std::atomic<int> convert_next{0}, convert_done{0}, task_next{0};
    const int ntasks = int(tasks.size());
    const std::function<void(int)> job = [&](int) {
        for (int i; (i = convert_next.fetch_add(CONVERT_CHUNK, std::memory_order_relaxed)) < T;) {
            const int e = std::min(T, i + CONVERT_CHUNK);
            d0.convert(a, x, x_bf16, i, e);
            convert_done.fetch_add(e - i, std::memory_order_release);
        }
        wait_count(convert_done, T);
        for (int i; (i = task_next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) {
            const DenseLinear& d = *mats[tasks[i][0]];
            void* out = outs[tasks[i][0]];
            if (decode) d.panels_decode(a, path, tasks[i][1], tasks[i][2], out, out_bf16);
            else d.panels_prefill(a, path, tasks[i][1], tasks[i][2], out, out_bf16);
        }
    };
    pool.run(job);
}

inline void DenseLinear::forward_grouped(ThreadPool& pool, const void* x, bool x_bf16, int T, void* out,
                                         bool out_bf16) const {
    if (T <= 0) return;
    if (!mem_) throw std::logic_error("the matrix is not packed");
    const int rows = T * groups_;  // x [T, G K] read as T G rows of K
    const int path = path_for(1);  // the decode kernels, whatever T: each row meets only its group's panels
    Acts a = prepare_acts(g_, rows, path, true);
    std::vector<std::array<int, 3>> tasks;
    decode_tasks(*this, 0, pool.size(), tasks);
    constexpr int CONVERT_CHUNK = 16;
    std::atomic<int> convert_next{0}, convert_done{0}, task_next{0};
    const int ntasks = int(tasks.size());
    const std::function<void(int)> job = [&](int) {
        for (int i; (i = convert_next.fetch_add(CONVERT_CHUNK, std::memory_order_relaxed)) < rows;) {
            const int e = std::min(rows, i + CONVERT_CHUNK);
            convert(a, x, x_bf16, i, e);
            convert_done.fetch_add(e - i, std::memory_order_release);
        }
        wait_count(convert_done, rows);
        for (int i; (i = task_next.fetch_add(1, std::memory_order_relaxed)) < ntasks;)
            panels_grouped(a, path, tasks[i][1], tasks[i][2], T, out, out_bf16);
    };
    pool.run(job);
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
