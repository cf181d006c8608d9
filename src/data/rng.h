// Deterministic random numbers for the data pipeline. Every random choice about a sample comes from
// a generator keyed by (seed, epoch, sample, purpose), so results depend on neither thread timing nor
// the number of ranks: any rank that handles a sample makes the same choices for it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace sdt {

// What a generator is for; keeps the streams of different decisions independent.
enum class RngPurpose : uint64_t { Shuffle = 1, Caption = 2, Augment = 3, Crop = 4, Latents = 5, Noise = 6, PyramidScales = 7,
                                   NetworkDropout = 8, ValidationLatents = 9, ValidationNoise = 10 };

class Rng {
 public:
  Rng(uint64_t seed, uint64_t epoch, uint64_t sample, RngPurpose purpose);

  uint64_t next();                     // 64 random bits (xoshiro256**)
  double uniform();                    // [0, 1), 53 bits
  double uniform(double lo, double hi);
  int64_t randint(int64_t lo, int64_t hi);  // inclusive bounds, unbiased

  template <typename T>
  void shuffle(std::vector<T>& v) {  // Fisher-Yates
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(randint(0, static_cast<int64_t>(i) - 1))]);
  }

 private:
  uint64_t s_[4];
};

// The order Python's `random.Random(seed).shuffle` gives a list of n items: result[i] is the original position of
// the item that ends at i. kohya splits validation images with it, so the same seed holds out the same images.
// (MT19937 seeded by init_by_array with the seed's 32-bit words, Fisher-Yates with _randbelow's rejection sampling.)
std::vector<size_t> python_shuffle_order(size_t n, uint64_t seed);

}  // namespace sdt
