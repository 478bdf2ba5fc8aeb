// ThreadSanitizer driver for the thread pools, gather and background jobs
// (built and run by .ci/tsan; not part of the user build). It writes a small
// store with StoreWriter, computes a single-threaded reference, then runs
// concurrently: blocking gathers from several threads with varying thread
// counts, background GatherJobs (waited for, and destroyed unwaited), growth
// of the shared pool, and fork() with jobs in flight (the child checks that
// inherited jobs refuse to be waited for, runs a single-threaded gather, and
// exits normally: static destructors, the inherited job's destructor).
// Exit code 0 and no TSan report: clean.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "finegym/gather.hpp"
#include "finegym/gather_job.hpp"
#include "finegym/reader.hpp"
#include "finegym/thread_pool.hpp"
#include "finegym/writer.hpp"

using namespace finegym;

namespace {

constexpr std::uint64_t kN = 300, kT = 12, kC = 16;

void require(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "tsan_driver: FAILED: %s\n", what);
        std::fflush(stderr);
        std::_Exit(1);  // not exit(): other threads are still running
    }
}

void write_store(const std::string& path) {
    StoreWriter w(path, kN, true);
    std::vector<std::string> ids, videos(kN);
    for (std::uint64_t i = 0; i < kN; ++i) ids.push_back("id" + std::to_string(i));
    w.add_strings("ids", ids);
    std::vector<std::int32_t> labels(kN), minus(kN, -1);
    for (std::uint64_t i = 0; i < kN; ++i) labels[i] = static_cast<std::int32_t>(i % 7);
    w.add_section("labels", DType::Int32, {kN}, labels.data(), labels.size() * 4);
    w.add_strings("meta/video", videos);
    for (const char* f : {"meta/event_start", "meta/event_end", "meta/element_start", "meta/element_end"})
        w.add_section(f, DType::Int32, {kN}, minus.data(), minus.size() * 4);
    w.begin_features("x", DType::Float32, kT, kC);
    std::vector<float> rows(kT * kC);
    for (std::uint64_t i = 0; i < kN; ++i) {
        for (std::size_t e = 0; e < rows.size(); ++e) rows[e] = static_cast<float>(i * 1000 + e);
        w.append_features(rows.data(), rows.size() * sizeof(float));
    }
    w.end_features({});
    w.commit();
}

GatherSpec spec_for(SampleMode mode) {
    GatherSpec s;
    s.num_segments = 5;
    s.clip_len = 2;
    s.mode = mode;
    s.seed = 7;
    return s;
}

GatherOptions options_for(unsigned threads) {
    GatherOptions o;
    o.epoch = 3;
    o.threads = threads;
    return o;
}

std::vector<float> run_gather(const StoreReader& r, const std::vector<std::int64_t>& idx, unsigned threads,
                              SampleMode mode) {
    const auto& col = r.column("x");
    const auto spec = spec_for(mode);
    std::vector<float> out(idx.size() * output_rows(col, spec) * kC);
    gather(r, col, idx.data(), idx.size(), spec, options_for(threads), out.data(), *ThreadPool::shared(threads));
    return out;
}

// Standardised (the column's statistics, read by every thread) into rows of
// kC + 3 floats, as a concatenated multi-column gather writes them; the 3
// floats after each row are left as they were.
std::vector<float> run_normalized_strided(const StoreReader& r, const std::vector<std::int64_t>& idx,
                                          unsigned threads) {
    const auto& col = r.column("x");
    auto spec = spec_for(SampleMode::Train);
    spec.normalize = true;
    spec.out_dtype = DType::Float32;
    const std::size_t stride = kC + 3;
    std::vector<float> out(idx.size() * output_rows(col, spec) * stride, -1.0f);
    gather(r, col, idx.data(), idx.size(), spec, options_for(threads), out.data(), *ThreadPool::shared(threads),
           stride * sizeof(float));
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string path = argc > 1 ? argv[1] : "/tmp/finegym_tsan_store.fgs";
    write_store(path);
    StoreReader reader(path);
    const auto& col = reader.column("x");
    std::vector<std::int64_t> idx(kN);
    for (std::uint64_t i = 0; i < kN; ++i) idx[i] = static_cast<std::int64_t>((i * 37) % kN);
    const auto ref_train = run_gather(reader, idx, 1, SampleMode::Train);
    const auto ref_test = run_gather(reader, idx, 1, SampleMode::Test);
    const auto ref_norm = run_normalized_strided(reader, idx, 1);
    require(ref_norm[kC] == -1.0f && ref_norm[kC + 3] != -1.0f, "a strided gather leaves the gap");

    std::atomic<bool> stop{false};
    std::atomic<long> rounds{0};
    std::vector<std::thread> threads;
    // Blocking gathers from several threads, thread counts 1..8 (the shared
    // pool grows while others use it).
    for (unsigned t = 0; t < 3; ++t) {
        threads.emplace_back([&, t] {
            for (unsigned i = 0; !stop.load() || i < 10; ++i) {
                const unsigned n = 1 + (i + t) % 8;
                require(run_gather(reader, idx, n, SampleMode::Train) == ref_train, "concurrent gather");
                require(run_normalized_strided(reader, idx, n) == ref_norm, "concurrent normalised strided gather");
                ++rounds;
                if (i > 200) break;
            }
        });
    }
    // Background jobs: several in flight, some destroyed without wait().
    for (unsigned t = 0; t < 2; ++t) {
        threads.emplace_back([&, t] {
            for (unsigned i = 0; !stop.load() || i < 10; ++i) {
                const auto spec = spec_for(SampleMode::Test);
                const auto options = options_for(1 + (i + t) % 4);
                std::vector<std::vector<float>> outs(3, std::vector<float>(ref_test.size()));
                std::vector<std::unique_ptr<GatherJob>> jobs;
                for (auto& o : outs)
                    jobs.push_back(
                        std::make_unique<GatherJob>(reader, col, idx.data(), idx.size(), spec, options, o.data()));
                jobs[0]->wait();
                require(outs[0] == ref_test, "background job");
                jobs.clear();  // the others: the destructor waits
                require(outs[2] == ref_test, "background job destroyed unwaited");
                ++rounds;
                if (i > 200) break;
            }
        });
    }

    // Jobs submitted while the background workers poll, and after they have
    // parked (a gap longer than kPollFor): each finishes with nobody waiting
    // on it (done() turns true by itself), and wait() on a queued one returns.
    for (const auto gap : {std::chrono::microseconds(0), std::chrono::microseconds(300),
                           std::chrono::microseconds(ThreadPool::kPollFor) + std::chrono::milliseconds(3)}) {
        std::this_thread::sleep_for(gap);
        std::vector<float> out(ref_test.size());
        GatherJob job(reader, col, idx.data(), idx.size(), spec_for(SampleMode::Test), options_for(2), out.data());
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (!job.done() && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        require(job.done(), "a job runs without wait() (no lost wake-up)");
        job.wait();
        require(out == ref_test, "a job submitted to polling or parked workers");
        std::this_thread::sleep_for(gap);
        GatherJob waited(reader, col, idx.data(), idx.size(), spec_for(SampleMode::Test), options_for(2), out.data());
        waited.wait();
        require(waited.done() && out == ref_test, "wait() on a job queued behind a polling worker");
    }

    // fork() while all that runs, a few times; each child runs its checks and exits normally.
    for (int f = 0; f < 3; ++f) {
        std::vector<float> out(ref_test.size());
        GatherJob inherited(reader, col, idx.data(), idx.size(), spec_for(SampleMode::Test), options_for(2),
                            out.data());
        const pid_t pid = ::fork();
        if (pid == 0) {
            bool refused = false;
            try {
                inherited.wait();
            } catch (const ForkedJobError&) {
                refused = true;
            }
            require(refused, "an inherited job refuses wait() in the child");
            require(!inherited.owned(), "an inherited job is not owned by the child");
            // One thread only: TSan cannot start threads in the child of a
            // multi-threaded fork ("dup thread with used id"); new pools and
            // jobs in a child are covered by tests/test_calls.py instead.
            require(run_gather(reader, idx, 1, SampleMode::Train) == ref_train, "gather in the child");
            std::exit(0);  // normal exit: static destructors run (the inherited job returns at once)
        }
        require(pid > 0, "fork");
        int status = 0;
        ::waitpid(pid, &status, 0);
        require(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the forked child exited cleanly");
        inherited.wait();
        require(out == ref_test, "the parent's job across fork");
    }

    stop = true;
    for (auto& t : threads) t.join();
    std::printf("tsan_driver: ok (%ld rounds, %u cores, pool cap %u)\n", rounds.load(),
                ThreadPool::default_threads(), ThreadPool::max_threads());
    ::unlink(path.c_str());
    return 0;
}
