// A gather running in the background on ThreadPool::background(), the
// loader's prefetch. The job belongs to the process that started it:
//   - in that process, wait() blocks until it is done (rethrowing its
//     error) and the destructor waits for it;
//   - in a fork()ed child (where the thread running it does not exist),
//     wait() throws ForkedJobError and the destructor returns at once,
//     leaking the job's small shared state (its mutex or condition variable
//     may have been copied mid-use: destroying them could hang).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>

#include <sys/types.h>

#include "finegym/gather.hpp"

namespace finegym {

class ForkedJobError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class GatherJob {
public:
    // Starts gather(reader, col, indices, batch, spec, options, out, ThreadPool::shared(options.threads),
    // out_row_stride) in the background. Index, spec and stride errors are
    // thrown here, at submission. The caller keeps reader, indices and out
    // alive until this job is destroyed.
    GatherJob(const StoreReader& reader, const FeatureColumn& col, const std::int64_t* indices, std::size_t batch,
              const GatherSpec& spec, const GatherOptions& options, void* out, std::size_t out_row_stride = 0);
    ~GatherJob();
    GatherJob(const GatherJob&) = delete;
    GatherJob& operator=(const GatherJob&) = delete;

    // Blocks until the gather is done; rethrows its error (every call).
    // Throws ForkedJobError in a process other than the one that started it.
    void wait() const;

    // True once the gather has finished (successfully or not); never blocks
    // for long. Throws ForkedJobError in a process other than the one that
    // started it, as wait() does.
    bool done() const;

    // True in the process that started the job.
    bool owned() const noexcept;

private:
    [[noreturn]] void throw_forked() const;
    struct State;
    std::shared_ptr<State> state_;
    pid_t owner_pid_;
};

}  // namespace finegym
