// Worker threads, process-wide and persistent.
//
// parallel_for(n, fn) runs fn(i) for every i in [0, n): the calling thread
// takes chunks too, and it waits only for chunks that were actually started,
// never for helpers still queued. So a parallel_for never deadlocks, even
// when called from several threads at once or while every worker is busy.
//
// Two process-wide pools: shared() for the data-parallel loops of gather
// (at most max_threads() - 1 workers: the caller is one more thread), and
// background() for whole background jobs (GatherJob), kBackgroundThreads
// workers; both start their threads once and reuse them.
//
// The pools are never destroyed (their workers end with the process), so a
// thread still gathering while the process exits finds them intact.
//
// Idle workers of the background pool poll before they park: a worker that
// runs out of tasks re-checks the queue every kPollInterval for kPollFor,
// and while there are at least as many pollers as queued tasks, submit()
// queues without waking anyone (no futex wake, which is a cross-CPU
// interrupt: 40 to 70 us of the submitting thread's time on our VM, paid by
// the loader's consumer on every batch). A job
// submitted that way starts within about one interval; wake() starts it at
// once (GatherJob::wait calls it for a job it is about to block on). After
// kPollFor without work the worker parks, and submit() wakes it as usual.
//
// Fork: worker threads do not survive fork(). A pthread_atfork child handler
// leaks the parent's pools in the child (joining or destroying their
// std::thread objects, mutexes or condition variables there would abort or
// hang); the next shared()/background() call builds fresh pools.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>
#include <vector>

#include <sys/types.h>

namespace finegym {

class ThreadPool {
public:
    // poll_when_idle: idle workers poll before they park (see above).
    explicit ThreadPool(unsigned threads, bool poll_when_idle = false);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    unsigned size() const noexcept { return static_cast<unsigned>(workers_.size()); }

    // fn(i) for i in [0, n), using at most `max_threads` threads (0: all
    // workers plus the caller). Rethrows the first exception thrown by fn.
    void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn, unsigned max_threads = 0);

    // Runs `task` on a worker, later; the task must not throw. Needs size() >= 1.
    void submit(std::function<void()> task);

    // Wakes a worker now if one is waiting (idle or polling): for a caller
    // about to block on a submitted task.
    void wake();

    static constexpr std::chrono::microseconds kPollInterval{100};
    static constexpr std::chrono::milliseconds kPollFor{5};

    // The process-wide pool for `threads` threads (0: default_threads()),
    // `threads` capped at max_threads(). It grows when more are asked for (up
    // to the cap) and never shrinks: callers cap their share with
    // parallel_for's max_threads.
    static std::shared_ptr<ThreadPool> shared(unsigned threads);

    // The process-wide pool of kBackgroundThreads workers for background jobs.
    static std::shared_ptr<ThreadPool> background();
    static constexpr unsigned kBackgroundThreads = 4;

    // One thread per core (std::thread::hardware_concurrency, at least 1).
    static unsigned default_threads() noexcept;
    // The cap on the threads of one gather: the number of cores.
    static unsigned max_threads() noexcept { return default_threads(); }

private:
    void worker_loop();
    void post(std::function<void()> task);

    std::vector<std::thread> workers_;
    std::queue<std::function<void()>> tasks_;
    std::mutex mutex_;
    std::condition_variable cv_;
    bool stop_ = false;
    const bool poll_when_idle_;
    unsigned polling_ = 0;  // workers in their polling phase (guarded by mutex_)
    pid_t owner_pid_;
};

}  // namespace finegym
