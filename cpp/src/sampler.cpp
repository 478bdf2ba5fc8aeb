#include "finegym/sampler.hpp"

#include <algorithm>
#include <vector>

#include "finegym/hash.hpp"

namespace finegym {

std::uint64_t sample_random(std::uint64_t seed, std::uint64_t epoch, std::uint64_t index, std::uint64_t k) noexcept {
    const std::uint64_t key[4] = {seed, epoch, index, k};
    return hash64(key, sizeof key);
}

namespace {

// round_half_even(num / den) for num >= 0, den > 0, exactly (numpy.around).
std::uint64_t round_half_even(std::uint64_t num, std::uint64_t den) noexcept {
    const std::uint64_t q = num / den, r = num % den;
    if (2 * r > den) return q + 1;
    if (2 * r == den) return q + (q & 1);
    return q;
}

}  // namespace

void sample_segments(std::uint64_t T, std::uint64_t K, std::uint64_t L, SampleMode mode, const SampleKey& key,
                     std::uint64_t* out) {
    // Clip start offsets first (SampleFrames._get_train_clips / _get_test_clips),
    // written to out[k * L]; then each clip is expanded to L segments, mod T.
    const bool span_ok = T + 1 > L;              // T - L + 1 > 0
    const std::uint64_t span = span_ok ? T - L + 1 : 0;  // possible clip starts
    for (std::uint64_t k = 0; k < K; ++k) {
        std::uint64_t offset = 0;
        if (mode == SampleMode::Test) {
            // floor((k + 0.5) * span / K); all zeros when T < L.
            if (span_ok) offset = ((2 * k + 1) * span) / (2 * K);
        } else {
            const std::uint64_t avg = span / K;
            if (avg > 0) {
                offset = k * avg + bounded(sample_random(key.seed, key.epoch, key.index, k), avg);
            } else if (T > K && T > L) {
                // Only reachable with L > 1 (span < K < T): mmaction2 then
                // draws K starts from [0, span) and sorts them (below).
                offset = bounded(sample_random(key.seed, key.epoch, key.index, k), span);
            } else if (span_ok) {
                offset = round_half_even(k * span, K);  // deterministic when T < K
            }
        }
        out[k * L] = offset;
    }
    if (mode == SampleMode::Train && span_ok && span / K == 0 && T > K && T > L) {
        // The sorted-draws branch: sort the K starts (stored at stride L).
        std::vector<std::uint64_t> starts(K);
        for (std::uint64_t k = 0; k < K; ++k) starts[k] = out[k * L];
        std::sort(starts.begin(), starts.end());
        for (std::uint64_t k = 0; k < K; ++k) out[k * L] = starts[k];
    }
    for (std::uint64_t k = 0; k < K; ++k) {
        const std::uint64_t start = out[k * L];
        for (std::uint64_t l = 0; l < L; ++l) out[k * L + l] = (start + l) % T;
    }
}

}  // namespace finegym
