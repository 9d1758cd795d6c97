// A persistent pool of pinned worker threads that park on a condition variable between jobs.
//
// run(job) hands job(worker) to every worker and parks the caller until all return; concurrent run()
// calls from several Python threads are serialized. Workers never spin while idle (on a small machine a
// spinning worker steals the core the caller needs); inside a job the phases meet at a barrier that
// spins briefly and then yields.
#pragma once
#include <sched.h>

#include <algorithm>
#include <atomic>
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

class SpinBarrier {
   public:
    explicit SpinBarrier(int n) : n_(n) {}
    void wait() {
        if (n_ == 1) return;
        const int phase = phase_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
            arrived_.store(0, std::memory_order_relaxed);
            phase_.fetch_add(1, std::memory_order_release);
            return;
        }
        for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
            if (spins < 4000) cpu_relax();
            else std::this_thread::yield();  // a straggler was descheduled: give it the core
        }
    }

   private:
    const int n_;
    std::atomic<int> arrived_{0};
    std::atomic<int> phase_{0};
};

class ThreadPool {
   public:
    // cpus[i]: the CPU worker i is pinned to (empty: not pinned); nodes[i]: its NUMA node.
    ThreadPool(int threads, std::vector<int> cpus, std::vector<int> nodes)
        : n_(threads < 1 ? 1 : threads), cpus_(std::move(cpus)), nodes_(std::move(nodes)) {
        nodes_.resize(n_, 0);
        for (int& nd : nodes_) nd = nd < 0 ? 0 : nd;
        num_nodes_ = 1;
        for (int nd : nodes_) num_nodes_ = std::max(num_nodes_, nd + 1);
        pinned_.assign(n_, 0);
        if (n_ > 1)
            for (int i = 0; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
    }
    ~ThreadPool() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_; }
    int num_nodes() const { return num_nodes_; }
    int node_of(int worker) const { return nodes_[worker]; }
    int pinned_count() const {
        int c = 0;
        for (int i = 0; i < n_; ++i) c += pinned_[i];
        return c;
    }

    // job(worker_index) on every worker; the caller parks until all are done. With one thread the
    // caller runs the job itself (no hand-off latency).
    void run(const std::function<void(int)>& job) {
        std::lock_guard<std::mutex> serial(call_m_);
        if (n_ == 1) {
            job(0);
            return;
        }
        {
            std::lock_guard<std::mutex> lk(m_);
            job_ = &job;
            pending_ = n_;
            ++generation_;
        }
        cv_.notify_all();
        std::unique_lock<std::mutex> lk(m_);
        done_cv_.wait(lk, [&] { return pending_ == 0; });
        job_ = nullptr;
    }

   private:
    void loop(int idx) {
        if (idx < int(cpus_.size()) && cpus_[idx] >= 0 && cpus_[idx] < CPU_SETSIZE) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus_[idx], &set);
            pinned_[idx] = sched_setaffinity(0, sizeof(set), &set) == 0;
        }
        uint64_t seen = 0;
        for (;;) {
            const std::function<void(int)>* job;
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
                job = job_;
            }
            (*job)(idx);
            {
                std::lock_guard<std::mutex> lk(m_);
                if (--pending_ == 0) done_cv_.notify_one();
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
    const std::function<void(int)>* job_ = nullptr;
    int pending_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
};

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
