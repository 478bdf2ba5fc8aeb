// A fixed set of worker threads for data-parallel loops.
//
// parallel_for(n, fn) runs fn(i) for every i in [0, n): the calling thread
// takes chunks too, and it waits only for chunks that were actually started,
// never for helpers still queued. So a parallel_for never deadlocks, even
// when called from several threads at once or while every worker is busy.
//
// Fork: worker threads do not survive fork(). A pool notices it is in a child
// (getpid() changed) and rebuilds itself there; see ThreadPool::for_process.
#pragma once

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
    explicit ThreadPool(unsigned threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    unsigned size() const noexcept { return static_cast<unsigned>(workers_.size()); }

    // fn(i) for i in [0, n), using at most `max_threads` threads (0: all
    // workers plus the caller). Rethrows the first exception thrown by fn.
    void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn, unsigned max_threads = 0);

    // The process-wide pool, with at least `threads` - 1 workers (0: one
    // thread per core); it grows when more are asked for and is rebuilt in a
    // fork()ed child.
    static std::shared_ptr<ThreadPool> shared(unsigned threads);

    static unsigned default_threads() noexcept;

private:
    void worker_loop();
    void post(std::function<void()> task);

    std::vector<std::thread> workers_;
    std::queue<std::function<void()>> tasks_;
    std::mutex mutex_;
    std::condition_variable cv_;
    bool stop_ = false;
    pid_t owner_pid_;
};

}  // namespace finegym
