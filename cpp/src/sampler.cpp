#include "finegym/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "finegym/hash.hpp"

// The float64 rules below must round exactly as numpy does: CMakeLists.txt
// builds the core with -ffp-contract=off (no fused multiply-add).

namespace finegym {

std::uint64_t sample_random(std::uint64_t seed, std::uint64_t epoch, std::uint64_t index, std::uint64_t k) noexcept {
    const std::uint64_t key[4] = {seed, epoch, index, k};
    return hash64(key, sizeof key);
}

std::uint64_t clip_rows(std::uint64_t K, std::uint64_t L) {
    if (K == 0) throw std::invalid_argument("num_segments must be at least 1");
    if (L == 0) throw std::invalid_argument("clip_len must be at least 1");
    if (K > kMaxSampleCount || L > kMaxSampleCount || K > kMaxSampleCount / L)
        throw std::invalid_argument("num_segments x clip_len = " + std::to_string(K) + " x " + std::to_string(L) +
                                    " is too large (at most 2^53 segments per instance)");
    return K * L;
}

namespace {

// round_half_even(num / den) for den > 0, exactly (numpy.around on exact values).
std::uint64_t round_half_even(uint128_t num, std::uint64_t den) noexcept {
    const auto q = static_cast<std::uint64_t>(num / den);
    const auto r = static_cast<std::uint64_t>(num % den);
    const uint128_t twice = static_cast<uint128_t>(r) * 2;
    if (twice > den) return q + 1;
    if (twice == den) return q + (q & 1);
    return q;
}

// numpy.around (= numpy.round) of a float64 v >= 0: half to even. v - floor(v)
// is exact for v >= 0, so the tie test sees exactly what numpy sees.
std::uint64_t around(double v) noexcept {
    double f = std::floor(v);
    const double d = v - f;
    if (d > 0.5 || (d == 0.5 && std::fmod(f, 2.0) != 0.0)) f += 1.0;
    return static_cast<std::uint64_t>(f);
}

// Clip start offsets, mmaction2 1.2.0 SampleFrames (frame_interval = 1, so
// ori_clip_len = L in both modes), in float64 where it computes in float64.
std::uint64_t mmaction2_test_offset(std::uint64_t T, std::uint64_t K, std::uint64_t L, std::uint64_t k) {
    if (L == 1) {
        // _get_test_clips, clip_len == 1: avg = T / K; k * avg + avg / 2,
        // truncated by astype(int32) (after np.mod by T, a no-op below T).
        const double avg = static_cast<double>(T) / static_cast<double>(K);
        const double off = static_cast<double>(k) * avg + avg / 2.0;
        return static_cast<std::uint64_t>(off) % T;
    }
    // clip_len > 1: max_offset = max(T - L, 0); K > 1: round(k * max_offset / (K - 1)),
    // K == 1: max_offset // 2.
    const std::uint64_t max_offset = T > L ? T - L : 0;
    if (K == 1) return max_offset / 2;
    const double between = static_cast<double>(max_offset) / static_cast<double>(K - 1);
    return around(static_cast<double>(k) * between);
}

}  // namespace

void sample_segments(std::uint64_t T, std::uint64_t K, std::uint64_t L, SampleMode mode, const SampleKey& key,
                     std::uint64_t* out, Sampling sampling) {
    if (T == 0) throw std::invalid_argument("T (the instance's segment count) must be at least 1");
    if (T > kMaxSampleCount) throw std::invalid_argument("T = " + std::to_string(T) + " is above 2^53");
    clip_rows(K, L);
    if (mode != SampleMode::Test && mode != SampleMode::Train) throw std::invalid_argument("unknown sample mode");
    if (sampling != Sampling::MMAction2 && sampling != Sampling::Exact)
        throw std::invalid_argument("unknown sampling rule set");
    const bool exact = sampling == Sampling::Exact;
    // Clip start offsets first (SampleFrames._get_train_clips / _get_test_clips),
    // written to out[k * L]; then each clip is expanded to L segments, mod T.
    const bool span_ok = T + 1 > L;                      // span = T - L + 1 > 0
    const std::uint64_t span = span_ok ? T - L + 1 : 0;  // possible clip starts
    const std::uint64_t avg = span / K;  // train: (T - L + 1) // K, or <= 0 when !span_ok
    const bool sorted_draws = mode == SampleMode::Train && avg == 0 && T > K && T > L;
    for (std::uint64_t k = 0; k < K; ++k) {
        std::uint64_t offset = 0;
        if (mode == SampleMode::Test) {
            if (!exact) {
                offset = mmaction2_test_offset(T, K, L, k);
            } else if (span_ok) {
                // floor((k + 0.5) * span / K); all zeros when T < L.
                offset = static_cast<std::uint64_t>(static_cast<uint128_t>(2 * k + 1) * span / (2 * K));
            }
        } else if (avg > 0) {
            offset = k * avg + bounded(sample_random(key.seed, key.epoch, key.index, k), avg);
        } else if (sorted_draws) {
            // Only reachable with L > 1 (span < K < T): K starts drawn from
            // [0, span), then sorted (below).
            offset = bounded(sample_random(key.seed, key.epoch, key.index, k), span);
        } else if (span_ok) {
            // avg == 0 (T <= K): deterministic, around(k * span / K); mmaction2
            // computes ratio = (T - L + 1.0) / K and around(k * ratio) in float64.
            offset = exact ? round_half_even(static_cast<uint128_t>(k) * span, K)
                           : around(static_cast<double>(k) * (static_cast<double>(span) / static_cast<double>(K)));
        }
        out[k * L] = offset;
    }
    if (sorted_draws) {
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
