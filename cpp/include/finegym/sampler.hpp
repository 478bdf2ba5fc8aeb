// Temporal-segment sampling: which of an instance's T stored segments make up
// its K clips of L segments. These are mmaction2's SampleFrames rules
// (frame_interval = 1, out-of-bound 'loop'), computed in exact integer
// arithmetic; README.md ("Sampling") states them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace finegym {

enum class SampleMode : std::uint8_t { Test = 0, Train = 1 };

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

// Writes K * L segment indices (each in [0, T)) for one instance into `out`,
// clip by clip. T >= 1, K >= 1, L >= 1.
void sample_segments(std::uint64_t T, std::uint64_t K, std::uint64_t L, SampleMode mode, const SampleKey& key,
                     std::uint64_t* out);

}  // namespace finegym
