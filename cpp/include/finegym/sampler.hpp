// Temporal-segment sampling: which of an instance's T stored segments make up
// its K clips of L segments. Two rule sets (README.md, "Sampling"):
//   Sampling::MMAction2 (default): bit-exact with mmaction2 1.2.0's
//     SampleFrames (frame_interval = 1, out_of_bound_opt 'loop'), including
//     its float64 arithmetic and its test-mode rule for clip_len > 1;
//   Sampling::Exact: the same rules computed in exact integer arithmetic, and
//     the centred rule floor((k + 1/2) * span / K) in test mode for every L.
#pragma once

#include <cstddef>
#include <cstdint>

namespace finegym {

enum class SampleMode : std::uint8_t { Test = 0, Train = 1 };
enum class Sampling : std::uint8_t { MMAction2 = 0, Exact = 1 };

// The largest T, K, L and K * L sample_segments accepts (2^53: every count
// is then exact in a float64, as in mmaction2's arithmetic).
constexpr std::uint64_t kMaxSampleCount = std::uint64_t{1} << 53;

// The counter-based random stream: the u64 for draw `k` of instance `index`
// in (`seed`, `epoch`) is XXH64 of the four values as little-endian u64s.
// No state: the same key gives the same number in any thread, batch or order.
std::uint64_t sample_random(std::uint64_t seed, std::uint64_t epoch, std::uint64_t index, std::uint64_t k) noexcept;

// A uniform integer in [0, n) from a random u64 (n > 0): floor(r * n / 2^64).
__extension__ typedef unsigned __int128 uint128_t;  // GCC/Clang; __extension__ keeps -Wpedantic quiet
inline std::uint64_t bounded(std::uint64_t r, std::uint64_t n) noexcept {
    return static_cast<std::uint64_t>((static_cast<uint128_t>(r) * n) >> 64);
}

struct SampleKey {
    std::uint64_t seed = 0;
    std::uint64_t epoch = 0;
    std::uint64_t index = 0;  // the instance's index in the store
};

// K * L, or std::invalid_argument when K or L is 0, or K, L or K * L is above
// kMaxSampleCount (so the product never wraps).
std::uint64_t clip_rows(std::uint64_t K, std::uint64_t L);

// Writes K * L segment indices (each in [0, T)) for one instance into `out`,
// clip by clip. Throws std::invalid_argument unless 1 <= T, K, L and
// T, K * L <= kMaxSampleCount.
void sample_segments(std::uint64_t T, std::uint64_t K, std::uint64_t L, SampleMode mode, const SampleKey& key,
                     std::uint64_t* out, Sampling sampling = Sampling::MMAction2);

}  // namespace finegym
