// Host tasks: the CPU half of the hybrid step, started and joined from a device stream.
//
// A HostTask is one prepared forward with fixed pointers: hidden, ids, weights and output in (pinned)
// host buffers, a MoELayer, a ThreadPool, and the HostWorker thread it runs on. Two C entry points with
// the signature of a CUDA host function, void fn(void* user_data), take the task as user data:
//
//   host_enqueue(task)  pushes the task onto its worker's queue and returns at once;
//   host_sync(task)     blocks the calling thread (a stream's host-callback thread) until every enqueue
//                       of this task so far has run.
//
// So `cudaLaunchHostFunc(side, host_enqueue, task)` after the copy of the hidden states starts the CPU
// experts the moment the copy lands, and `cudaLaunchHostFunc(side, host_sync, task)` before the copy of
// the output back holds the stream until they are done (KTransformers' submit/sync pair). Neither entry
// point touches Python (no GIL: a Python host function in a CUDA graph fires once only, and taking the
// GIL on the driver's thread can deadlock), allocates or throws; a task's pointers never change, so a
// graph that captured the two host nodes replays them any number of times. The task's forward runs on
// the worker thread, which is worker 0 of the kernels' pool; an error it hits (an expert id out of range
// in an unchecked decode step) zeroes the output and is kept in the task for the caller to raise.
//
// HostCallbackThread runs host functions in launch order on one native thread, as the CUDA runtime
// runs a stream's host functions: the CPU stand-in of a device stream (tests and the stand-in bench).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#include "moe_layer.h"
#include "thread_pool.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

class HostWorker;

// Errors a task can keep (HostTask::error_code).
enum HostTaskError : int { HOST_OK = 0, HOST_BAD_EXPERT_ID = 1, HOST_FAILED = 2 };

struct HostTask {
    const MoELayer* layer;
    ThreadPool* pool;
    HostWorker* worker;
    const void* hidden;
    bool hidden_bf16;
    int T, K;
    const int64_t* ids;
    const float* weights;
    void* out;
    bool out_bf16;
    size_t out_bytes;

    std::atomic<uint64_t> submitted{0};  // enqueues so far
    std::atomic<uint64_t> completed{0};  // runs finished so far (never ahead of submitted)
    std::atomic<int> error_code{HOST_OK};
    char error_message[256] = {0};  // written by the worker before error_code, read after it

    HostTask(const MoELayer* layer, ThreadPool* pool, HostWorker* worker, const void* hidden, bool hidden_bf16,
             int T, int K, const int64_t* ids, const float* weights, void* out, bool out_bf16, size_t out_bytes)
        : layer(layer), pool(pool), worker(worker), hidden(hidden), hidden_bf16(hidden_bf16), T(T), K(K), ids(ids),
          weights(weights), out(out), out_bf16(out_bf16), out_bytes(out_bytes) {}
    // A task still queued or running is waited for: its buffers must outlive every run.
    ~HostTask();
    HostTask(const HostTask&) = delete;
    HostTask& operator=(const HostTask&) = delete;

    void run() noexcept {
        try {
            if (T > 0) layer->forward(*pool, hidden, hidden_bf16, T, K, ids, weights, out, out_bf16);
        } catch (const std::out_of_range& e) {
            fail(HOST_BAD_EXPERT_ID, e.what());
        } catch (const std::exception& e) {
            fail(HOST_FAILED, e.what());
        } catch (...) {
            fail(HOST_FAILED, "unknown error");
        }
    }

   private:
    void fail(int code, const char* what) noexcept {
        std::memset(out, 0, out_bytes);  // the CPU part contributes nothing rather than stale rows
        if (error_code.load(std::memory_order_acquire) == HOST_OK) {
            std::strncpy(error_message, what, sizeof(error_message) - 1);
            error_code.store(code, std::memory_order_release);
        }
    }
};

// One thread that runs enqueued tasks in order. The queue is a fixed ring, so enqueueing never
// allocates; a full ring (more than QUEUE tasks in flight, which a layer-by-layer step never has)
// makes the enqueuer wait for room.
class HostWorker {
   public:
    static constexpr int QUEUE = 256;
    // An idle worker spins this long before parking: the next layer's task usually follows within it.
    static constexpr int SPIN_US = 50;

    HostWorker() : thread_([this] { loop(); }) {}
    ~HostWorker() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_.store(true);
        }
        cv_.notify_all();
        thread_.join();
    }
    HostWorker(const HostWorker&) = delete;
    HostWorker& operator=(const HostWorker&) = delete;

    void enqueue(HostTask* t) noexcept {
        t->submitted.fetch_add(1, std::memory_order_acq_rel);
        {
            std::unique_lock<std::mutex> lk(m_);
            room_cv_.wait(lk, [&] { return tail_ - head_ < uint64_t(QUEUE); });
            ring_[tail_ % QUEUE] = t;
            tail_ += 1;
            pending_.store(tail_, std::memory_order_release);
        }
        cv_.notify_one();
    }

    // Block until `t` has completed `target` runs.
    void wait_for(const HostTask* t, uint64_t target) noexcept {
        auto done = [&] { return t->completed.load(std::memory_order_acquire) >= target; };
        if (spin(done)) return;
        std::unique_lock<std::mutex> lk(m_);
        done_cv_.wait(lk, done);
    }

    uint64_t tasks_run() const { return runs_.load(std::memory_order_acquire); }

   private:
    template <class P>
    static bool spin(P&& pred) {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
        for (int i = 0;; ++i) {
            if (pred()) return true;
            cpu_relax();
            if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return pred();
        }
    }

    void loop() {
        uint64_t taken = 0;
        for (;;) {
            auto ready = [&] { return pending_.load(std::memory_order_acquire) > taken || stop_.load(); };
            if (!spin(ready)) {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return tail_ > taken || stop_.load(); });
            }
            HostTask* t;
            {
                std::lock_guard<std::mutex> lk(m_);
                if (head_ == tail_) {
                    if (stop_.load()) return;  // stopped with nothing left to run
                    continue;
                }
                t = ring_[head_ % QUEUE];
                head_ += 1;
                taken = head_;
            }
            room_cv_.notify_one();
            t->run();
            runs_.fetch_add(1, std::memory_order_acq_rel);
            {
                // Under the lock, so a waiter between its predicate check and its sleep cannot miss it.
                std::lock_guard<std::mutex> lk(m_);
                t->completed.fetch_add(1, std::memory_order_acq_rel);
            }
            done_cv_.notify_all();
        }
    }

    std::mutex m_;
    std::condition_variable cv_, done_cv_, room_cv_;
    HostTask* ring_[QUEUE] = {};
    uint64_t head_ = 0, tail_ = 0;
    std::atomic<uint64_t> pending_{0};  // tail_, readable without the lock while spinning
    std::atomic<uint64_t> runs_{0};
    std::atomic<bool> stop_{false};
    std::thread thread_;  // last: started after every other member exists
};

inline HostTask::~HostTask() { worker->wait_for(this, submitted.load(std::memory_order_acquire)); }

// The two host functions. C linkage and the signature of cudaHostFn_t: void (*)(void* userData).
extern "C" {
typedef void (*host_fn_t)(void*);
}

inline void host_enqueue_impl(void* user_data) noexcept {
    auto* t = static_cast<HostTask*>(user_data);
    t->worker->enqueue(t);
}

inline void host_sync_impl(void* user_data) noexcept {
    auto* t = static_cast<HostTask*>(user_data);
    t->worker->wait_for(t, t->submitted.load(std::memory_order_acquire));
}

// Runs host functions in launch order on one native thread (no Python state on it), like the host
// functions of one device stream: the CPU stand-in of cudaLaunchHostFunc.
class HostCallbackThread {
   public:
    HostCallbackThread() : thread_([this] { loop(); }) {}
    ~HostCallbackThread() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    HostCallbackThread(const HostCallbackThread&) = delete;
    HostCallbackThread& operator=(const HostCallbackThread&) = delete;

    // Returns the number of host functions launched so far, this one included.
    uint64_t launch(host_fn_t fn, void* data) {
        uint64_t n;
        {
            std::lock_guard<std::mutex> lk(m_);
            q_.emplace_back(fn, data);
            n = ++launched_;
        }
        cv_.notify_one();
        return n;
    }

    uint64_t launched() {
        std::lock_guard<std::mutex> lk(m_);
        return launched_;
    }
    uint64_t executed() const { return executed_.load(std::memory_order_acquire); }

    // Block until the first `n` launched host functions have run.
    void wait_executed(uint64_t n) {
        std::unique_lock<std::mutex> lk(m_);
        done_cv_.wait(lk, [&] { return executed_.load(std::memory_order_acquire) >= n; });
    }

   private:
    void loop() {
        for (;;) {
            std::pair<host_fn_t, void*> item;
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return !q_.empty() || stop_; });
                if (q_.empty()) return;  // stop_ with nothing left
                item = q_.front();
                q_.pop_front();
            }
            item.first(item.second);
            {
                std::lock_guard<std::mutex> lk(m_);
                executed_.fetch_add(1, std::memory_order_acq_rel);
            }
            done_cv_.notify_all();
        }
    }

    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    std::deque<std::pair<host_fn_t, void*>> q_;
    uint64_t launched_ = 0;
    std::atomic<uint64_t> executed_{0};
    bool stop_ = false;
    std::thread thread_;
};

}  // namespace MOETIER_NS
}  // namespace moetier_kernels

// The entry points' addresses are what a device runtime is given; they live outside the variant
// namespace with C linkage but internal to this module (static), so two variants loaded in one process
// never collide.
extern "C" {
static void moetier_host_enqueue(void* user_data) { moetier_kernels::host_enqueue_impl(user_data); }
static void moetier_host_sync(void* user_data) { moetier_kernels::host_sync_impl(user_data); }
}
