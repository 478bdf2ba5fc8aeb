#include "finegym/stats.hpp"

#include <cmath>
#include <cstring>

#include "finegym/gather.hpp"  // half_to_float

namespace finegym {

ChannelStats::ChannelStats(std::uint64_t channels)
    : shift_(channels, 0.0), sum_(channels, 0.0), sum_sq_(channels, 0.0), row_(channels), channels_(channels) {}

void ChannelStats::add(const void* data, std::size_t rows, DType dtype) {
    const auto channels = static_cast<std::size_t>(channels_);
    if (rows == 0 || channels == 0) return;
    const auto* bytes = static_cast<const unsigned char*>(data);
    const std::size_t row_bytes = channels * dtype_size(dtype);
    double* const sum = sum_.data();
    double* const sum_sq = sum_sq_.data();
    const double* const shift = shift_.data();
    for (std::size_t r = 0; r < rows; ++r) {
        const unsigned char* src = bytes + r * row_bytes;
        if (dtype == DType::Float16) {
            for (std::size_t c = 0; c < channels; ++c) {
                std::uint16_t h;
                std::memcpy(&h, src + 2 * c, 2);
                row_[c] = half_to_float(h);
            }
        } else {
            std::memcpy(row_.data(), src, row_bytes);
        }
        if (count_ == 0)
            for (std::size_t c = 0; c < channels; ++c) shift_[c] = row_[c];
        const float* const x = row_.data();
        for (std::size_t c = 0; c < channels; ++c) {
            const double d = static_cast<double>(x[c]) - shift[c];
            sum[c] += d;
            sum_sq[c] += d * d;
        }
        ++count_;
    }
}

std::vector<float> ChannelStats::result() const {
    const auto channels = static_cast<std::size_t>(channels_);
    std::vector<float> out(2 * channels, 0.0f);
    if (count_ == 0) return out;
    const auto n = static_cast<double>(count_);
    for (std::size_t c = 0; c < channels; ++c) {
        const double m = sum_[c] / n;
        double var = sum_sq_[c] / n - m * m;
        if (var < 0) var = 0;  // rounding, when every value is (nearly) equal
        out[c] = static_cast<float>(shift_[c] + m);
        out[channels + c] = static_cast<float>(std::sqrt(var));
    }
    return out;
}

}  // namespace finegym
