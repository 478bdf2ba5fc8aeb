#include "finegym/thread_pool.hpp"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <exception>

namespace finegym {

ThreadPool::ThreadPool(unsigned threads, bool poll_when_idle)
    : poll_when_idle_(poll_when_idle), owner_pid_(::getpid()) {
    workers_.reserve(threads);
    for (unsigned i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
}

unsigned ThreadPool::default_threads() noexcept {
    // Read once: glibc answers hardware_concurrency() by reading a sysfs file,
    // which cost more than a small gather when it was asked on every call.
    static const unsigned n = [] {
        const unsigned c = std::thread::hardware_concurrency();
        return c == 0 ? 1u : c;
    }();
    return n;
}

void ThreadPool::submit(std::function<void()> task) { post(std::move(task)); }

void ThreadPool::post(std::function<void()> task) {
    bool covered;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        tasks_.push(std::move(task));
        // Each polling worker takes one queued task within kPollInterval
        // without a wake-up; a task beyond their number wakes a parked worker,
        // so jobs submitted together still run side by side.
        covered = polling_ >= tasks_.size();
    }
    if (!covered) cv_.notify_one();
}

void ThreadPool::wake() { cv_.notify_one(); }

void ThreadPool::worker_loop() {
    bool ran = false;  // whether this worker has just finished a task (then it polls before parking)
    for (;;) {
        std::function<void()> task;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            auto ready = [this] { return stop_ || !tasks_.empty(); };
            if (poll_when_idle_ && ran && !ready()) {
                // Polling phase: counted in polling_, so post() skips its notify.
                ++polling_;
                const auto until = std::chrono::steady_clock::now() + kPollFor;
                while (!ready() && std::chrono::steady_clock::now() < until) cv_.wait_for(lock, kPollInterval, ready);
                --polling_;  // under the mutex: a post() after this sees no poller and notifies
            }
            cv_.wait(lock, ready);
            if (stop_ && tasks_.empty()) return;
            task = std::move(tasks_.front());
            tasks_.pop();
        }
        task();
        ran = true;
    }
}

namespace {

// State shared by the caller and the helpers of one parallel_for. Helpers
// hold it by shared_ptr: one that starts after the loop is over finds no
// chunk left and returns without touching `fn`.
struct Loop {
    std::size_t n = 0;
    const std::function<void(std::size_t)>* fn = nullptr;
    std::atomic<std::size_t> next{0};
    std::atomic<std::size_t> done{0};
    std::mutex mutex;
    std::condition_variable cv;
    std::exception_ptr error;

    // Runs chunks until none is left.
    void run() {
        for (;;) {
            const std::size_t i = next.fetch_add(1, std::memory_order_relaxed);
            if (i >= n) return;
            try {
                (*fn)(i);
            } catch (...) {
                std::lock_guard<std::mutex> lock(mutex);
                if (!error) error = std::current_exception();
            }
            if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
                std::lock_guard<std::mutex> lock(mutex);
                cv.notify_all();
            }
        }
    }
};

}  // namespace

void ThreadPool::parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn, unsigned max_threads) {
    if (n == 0) return;
    auto loop = std::make_shared<Loop>();
    loop->n = n;
    loop->fn = &fn;
    unsigned threads = max_threads == 0 ? size() + 1 : max_threads;
    if (threads > size() + 1) threads = size() + 1;
    const std::size_t helpers = std::min<std::size_t>(threads - 1, n - 1);
    for (std::size_t h = 0; h < helpers; ++h) post([loop] { loop->run(); });
    loop->run();
    {
        std::unique_lock<std::mutex> lock(loop->mutex);
        loop->cv.wait(lock, [&] { return loop->done.load(std::memory_order_acquire) == n; });
    }
    if (loop->error) std::rethrow_exception(loop->error);
}

namespace {

// The process-wide pools. The mutex is held across fork() (pthread_atfork), so
// a child never inherits it locked by a thread that does not exist there; the
// child handler leaks the parent's pools (their threads are gone: joining or
// destroying their std::thread objects would abort, destroying a condition
// variable with waiters would hang). A bounded one-off per fork.
struct Registry {
    std::mutex mutex;
    std::shared_ptr<ThreadPool> compute;
    std::shared_ptr<ThreadPool> background;
};

void leak(std::shared_ptr<ThreadPool>& pool) {
    if (pool) new std::shared_ptr<ThreadPool>(std::move(pool));  // NOLINT: intentional leak after fork
    pool.reset();
}

// Never destroyed (deliberately): at exit, static destructors run while other
// threads (a Python daemon thread mid-gather, a background job) may still be
// using the pools; the process's end takes the idle workers with it.
Registry& registry() {
    static Registry& reg = *new Registry;  // NOLINT: intentionally immortal
    static const int registered = ::pthread_atfork([] { registry().mutex.lock(); },
                                                   [] { registry().mutex.unlock(); },
                                                   [] {
                                                       Registry& r = registry();
                                                       leak(r.compute);
                                                       leak(r.background);
                                                       r.mutex.unlock();
                                                   });
    (void)registered;
    return reg;
}

}  // namespace

std::shared_ptr<ThreadPool> ThreadPool::shared(unsigned threads) {
    if (threads == 0 || threads > max_threads()) threads = max_threads();
    const unsigned workers = threads - 1;  // the caller is one more thread
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    // (The atfork handler already leaked a parent's pool; this catches a pool
    // built before the handler was registered.)
    if (r.compute && r.compute->owner_pid_ != ::getpid()) leak(r.compute);
    // Grow only, up to max_threads() - 1 workers: callers cap their share with
    // parallel_for's max_threads. The old pool lives on while a caller holds it.
    if (!r.compute || r.compute->size() < workers) r.compute = std::make_shared<ThreadPool>(workers);
    return r.compute;
}

std::shared_ptr<ThreadPool> ThreadPool::background() {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    if (r.background && r.background->owner_pid_ != ::getpid()) leak(r.background);
    if (!r.background) r.background = std::make_shared<ThreadPool>(kBackgroundThreads, /*poll_when_idle=*/true);
    return r.background;
}

}  // namespace finegym
