// Per-channel statistics of a feature column: the mean and standard
// deviation of each channel over every row written (format version 3,
// features/COL/stats), accumulated while the writer streams the rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "finegym/format.hpp"

namespace finegym {

class ChannelStats {
public:
    explicit ChannelStats(std::uint64_t channels = 0);

    // Adds `rows` rows of C values of `dtype` (float32 or float16), back to back.
    void add(const void* data, std::size_t rows, DType dtype);

    std::uint64_t count() const noexcept { return count_; }
    // 2 x C float32 values: the C means, then the C standard deviations
    // (divided by the row count; 0 for a column of no rows). NaN or Inf
    // values make their channel's statistics NaN or Inf.
    std::vector<float> result() const;

private:
    // Sums of (x - shift) and its square per channel, in float64, with the
    // first row as the shift: the variance is then taken from deviations of
    // the size of the spread, not of the mean, which keeps the difference of
    // sums accurate when the mean is large next to the spread.
    std::vector<double> shift_, sum_, sum_sq_;
    std::vector<float> row_;  // one float16 row widened to float32
    std::uint64_t channels_ = 0;
    std::uint64_t count_ = 0;
};

}  // namespace finegym
