// A persistent pool of pinned worker threads that park on a condition variable between jobs.
//
// run(job) runs job(worker) on the calling thread and every background worker and returns when all are
// done; concurrent run() calls from several Python threads are serialized. An idle worker spins for at
// most idle_spin_us (50 microseconds unless raised; to catch back-to-back calls) and then parks: on a small machine a spinning
// worker would steal the core the caller needs. A job orders its phases by counting finished tasks
// (wait_count), so a worker the OS descheduled never holds up the others.
#pragma once
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "variant.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

inline void cpu_relax() { __builtin_ia32_pause(); }

// Wait until `count` reaches `target`: spin briefly, then yield (a straggler may have been descheduled:
// give it the core).
inline void wait_count(const std::atomic<int>& count, int target) {
    for (int spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
        if (spins < 4000) cpu_relax();
        else std::this_thread::yield();
    }
}

class ThreadPool {
   public:
    // threads workers in all: the calling thread is worker 0, threads - 1 background workers are pinned
    // to cpus[1..] (empty: not pinned); nodes[i]: NUMA node of worker i.
    ThreadPool(int threads, std::vector<int> cpus, std::vector<int> nodes)
        : n_(threads < 1 ? 1 : threads), cpus_(std::move(cpus)), nodes_(std::move(nodes)) {
        nodes_.resize(n_, 0);
        for (int& nd : nodes_) nd = nd < 0 ? 0 : nd;
        num_nodes_ = 1;
        for (int nd : nodes_) num_nodes_ = std::max(num_nodes_, nd + 1);
        pinned_.assign(n_, 0);
        for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
    }
    ~ThreadPool() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_.store(true);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_; }
    int num_nodes() const { return num_nodes_; }
    int node_of(int worker) const { return nodes_[worker]; }
    // How long an idle worker spins before it parks. Waking a parked worker costs a futex round trip
    // (measured 55 us on a 2-core VM), once per call: a decode step makes ~50 calls with a few hundred
    // microseconds of Python between them, so decode raises this for its duration and sets it back.
    static constexpr int DEFAULT_IDLE_SPIN_US = 50;
    int idle_spin_us() const { return idle_spin_us_.load(std::memory_order_relaxed); }
    void set_idle_spin_us(int us) { idle_spin_us_.store(us < 0 ? 0 : us, std::memory_order_relaxed); }

    int pinned_count() const {
        int c = 0;
        for (int i = 0; i < n_; ++i) c += pinned_[i];
        return c;
    }

    // job(w) for w = 0..size()-1, w = 0 on the calling thread; returns when all are done. Calls from
    // several threads are serialized.
    void run(const std::function<void(int)>& job) {
        std::lock_guard<std::mutex> serial(call_m_);
        if (n_ == 1) {
            job(0);
            return;
        }
        job_.store(&job);
        closed_.store(false);
        generation_.fetch_add(1);
        {
            std::lock_guard<std::mutex> lk(m_);  // pairs with the parked workers' predicate check
        }
        cv_.notify_all();
        job(0);
        // The job's work is done (it waits for its own tasks). Close it: a worker that has not entered yet
        // skips it; wait only for those inside, which are finishing.
        closed_.store(true);
        if (!spin_until([&] { return active_.load() == 0; })) {
            std::unique_lock<std::mutex> lk(m_);
            done_cv_.wait(lk, [&] { return active_.load() == 0; });
        }
    }

   private:
    // Spin for at most idle_spin_us() waiting for pred: back-to-back calls (the two halves of a layer, the
    // next layer) skip the futex round trip, and an idle pool is parked again soon after.
    template <class P>
    bool spin_until(P&& pred) const {
        const auto deadline =
            std::chrono::steady_clock::now() + std::chrono::microseconds(idle_spin_us_.load(std::memory_order_relaxed));
        for (int i = 0;; ++i) {
            if (pred()) return true;
            cpu_relax();
            if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return pred();
        }
    }

    void loop(int idx) {
        if (idx < int(cpus_.size()) && cpus_[idx] >= 0 && cpus_[idx] < CPU_SETSIZE) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus_[idx], &set);
            pinned_[idx] = sched_setaffinity(0, sizeof(set), &set) == 0;
        }
        uint64_t seen = 0;
        for (;;) {
            auto ready = [&] {
                return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen;
            };
            if (!spin_until(ready)) {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, ready);
            }
            if (stop_.load()) return;
            seen = generation_.load();
            active_.fetch_add(1);  // seq_cst with closed_: either run() sees us active, or we see it closed
            if (!closed_.load()) (*job_.load())(idx);
            if (active_.fetch_sub(1) == 1) {
                std::lock_guard<std::mutex> lk(m_);
                done_cv_.notify_one();
            }
        }
    }

    const int n_;
    std::vector<int> cpus_, nodes_;
    std::vector<char> pinned_;
    int num_nodes_ = 1;
    std::vector<std::thread> workers_;
    std::mutex call_m_, m_;
    std::condition_variable cv_, done_cv_;
    std::atomic<const std::function<void(int)>*> job_{nullptr};
    std::atomic<int> active_{0};
    std::atomic<bool> closed_{true};
    std::atomic<uint64_t> generation_{0};
    std::atomic<bool> stop_{false};
    std::atomic<int> idle_spin_us_{DEFAULT_IDLE_SPIN_US};
};

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
