#include "finegym/gather_job.hpp"

#include <unistd.h>

#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>

namespace finegym {

struct GatherJob::State {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    std::exception_ptr error;
};

GatherJob::GatherJob(const StoreReader& reader, const FeatureColumn& col, const std::int64_t* indices,
                     std::size_t batch, const GatherSpec& spec, const GatherOptions& options,
                     void* out, std::size_t out_row_stride)
    : state_(std::make_shared<State>()), owner_pid_(::getpid()) {
    // Fail at submission, not later in wait(): the same checks gather() starts with.
    check_indices(indices, batch, reader.num_instances());
    validate(spec);
    output_bytes(batch, output_rows(col, spec), col.channels, dtype_size(output_dtype(col, spec)));
    output_bytes(batch, output_rows(col, spec), output_row_stride(col, spec, out_row_stride), 1);
    // Plain pointers, captured by value; the state by shared_ptr, so a task
    // that outlives this object (it cannot in the owner: ~GatherJob waits)
    // never touches freed memory.
    const StoreReader* r = &reader;
    const FeatureColumn* c = &col;
    std::shared_ptr<State> state = state_;
    ThreadPool::background()->submit([state, r, c, indices, batch, spec, options, out, out_row_stride] {
        std::exception_ptr error;
        try {
            gather(*r, *c, indices, batch, spec, options, out, *ThreadPool::shared(options.threads), out_row_stride);
        } catch (...) {
            error = std::current_exception();
        }
        {
            std::lock_guard<std::mutex> lock(state->mutex);
            state->error = error;
            state->done = true;
        }
        state->cv.notify_all();
    });
}

bool GatherJob::owned() const noexcept { return owner_pid_ == ::getpid(); }

bool GatherJob::done() const {
    if (!owned()) throw_forked();
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->done;
}

void GatherJob::throw_forked() const {
    throw ForkedJobError("this background gather (GatherJob) was started in process " + std::to_string(owner_pid_) +
                         " and cannot be waited for in forked process " + std::to_string(::getpid()) +
                         ": its thread does not exist here; start a new iteration (or job) in this process");
}

void GatherJob::wait() const {
    if (!owned()) throw_forked();
    std::unique_lock<std::mutex> lock(state_->mutex);
    if (!state_->done) {
        // About to block: start the job now if it is still queued behind a
        // polling worker's interval (ThreadPool: submit() may not wake one).
        lock.unlock();
        ThreadPool::background()->wake();
        lock.lock();
    }
    state_->cv.wait(lock, [this] { return state_->done; });
    if (state_->error) std::rethrow_exception(state_->error);
}

GatherJob::~GatherJob() {
    if (!owned()) {
        // A forked child: leak the state (see the header).
        new std::shared_ptr<State>(std::move(state_));  // NOLINT: intentional leak after fork
        return;
    }
    std::unique_lock<std::mutex> lock(state_->mutex);
    state_->cv.wait(lock, [this] { return state_->done; });
}

}  // namespace finegym
