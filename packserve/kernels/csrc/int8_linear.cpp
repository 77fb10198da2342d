// Weight-only int8 linear for decode-sized batches (packserve/kernels/native.py builds it;
// kernels/quant.py's Int8Linear calls it).
//
// out[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n]: q int8 per output channel, x float32 or
// bfloat16 (widened to float32, exactly), sums in float32: the numbers of torch's
// _weight_int8pack_mm, which is slower at every size measured (quant.py). A tile of kChannels
// output channels x kRows rows keeps its sums in registers: each weight vector is loaded and
// converted once per tile and used for all its rows, each row vector for all its channels.
// Threads split the output channels.
//
// Batch invariance: each output element is one vector of sums that takes its products in a
// fixed order (group by group, see kGroup; the inputs zero-padded to whole groups), then the
// same halving reduction of its lanes. Which tile, thread or batch computes it changes none
// of that, so a row's output has the same bits alone, in any batch, with any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// Vectors of 8 float32 lanes (256 bits), also where AVX-512 has 16: GCC fuses a lane-wise fma
// (see multiply_add) into one instruction at 8 lanes but not at 16, and prefers 256-bit vectors
// on most AVX-512 CPUs anyway. A tile is kChannels output channels x kRows rows: its sums, row
// vectors and a weight vector fill the vector registers (32 with AVX-512, 16 with AVX2; more
// spill).
constexpr int kLanes = 8;
constexpr int kChannels = 4;
#if defined(__AVX512F__)
constexpr int kRows = 4;
#else
constexpr int kRows = 2;
#endif
// Work (multiply-adds) below which a call stays on one thread: waking a second costs more.
constexpr int64_t kMinParallelWork = 1 << 17;

// A tile asks for the weights of a later tile, about this many bytes ahead, while it reads
// its own: a decode step streams every weight from memory once, and the hardware prefetcher
// alone leaves the kernel waiting on it. SmolLM2-sized weights (85 MB, one row, Zen 3):
// 6.5 -> 10 GB/s on 1 thread, 11.5 -> 17-20 GB/s on 2. (Past the last tile this points
// beyond the weights: a prefetch never faults.)
constexpr int64_t kPrefetchBytes = 8192;

// Weights are read kGroup at a time, as int32 lanes of 4 bytes each: lane i of the bytes
// vector j (0..3) is weight 4 i + j of the group, which plain shifts sign-extend (GCC turns an
// int8 -> int32 vector conversion into one instruction per lane). The rows are copied into the
// same order, so each product pairs a weight with its input.
constexpr int64_t kGroup = 4 * kLanes;

// Loops over a tile's channels and rows, unrolled so its sums stay in registers (GCC keeps
// them in memory otherwise).
#define PS_UNROLLED _Pragma("GCC unroll 16")

typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
template <int N>
struct FloatsOf {
  typedef float type __attribute__((vector_size(4 * N)));
};
template <int N>
using Floats = typename FloatsOf<N>::type;

inline Vec load_floats(const float* x) {
  Vec v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// Bytes vector J of a group's int32 lanes, as float32 (exact).
template <int J>
inline Vec byte_lanes(Ints group) {
  return __builtin_convertvector((group << (24 - 8 * J)) >> 24, Vec);
}

#if defined(__FP_FAST_FMAF)
// One rounding per multiply-add, in every tile: left to itself the compiler fuses some tiles'
// multiply-adds and not others' (GCC avoids fused accumulator chains when tuning for AMD), and
// the sums would round differently by tile. Lane by lane, the compiler emits one vector fma.
inline Vec multiply_add(Vec a, Vec b, Vec c) {
  Vec out;
  for (int i = 0; i < kLanes; ++i) out[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return out;
}
#else
inline Vec multiply_add(Vec a, Vec b, Vec c) { return a * b + c; }  // no fma to fuse into
#endif

// The sum of v's lanes, halving: lane i + lane i + N/2, and so on down to one.
template <int N>
inline float sum_lanes(Floats<N> v) {
  if constexpr (N == 2) {
    return v[0] + v[1];
  } else {
    Floats<N / 2> low, high;
    std::memcpy(&low, &v, sizeof low);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
    return sum_lanes<N / 2>(low + high);
  }
}

struct Problem {
  const float* x;  // [rows, stride] float32 in group order, zero from k to stride
  int64_t stride;  // k rounded up to a whole group
  const int8_t* q;  // [channels, k]
  const float* scale;  // [channels]
  int64_t rows, channels, k;
};

// One group's lanes J: every channel's weights times every row's inputs, into the sums.
template <int C, int R, int J>
inline void multiply_lanes(const Ints (&w)[C], const float* x, int64_t stride, Vec (&acc)[C][R]) {
  Vec xv[R];
  PS_UNROLLED for (int r = 0; r < R; ++r) xv[r] = load_floats(x + r * stride + J * kLanes);
  PS_UNROLLED for (int c = 0; c < C; ++c) {
    const Vec wv = byte_lanes<J>(w[c]);
    PS_UNROLLED for (int r = 0; r < R; ++r) acc[c][r] = multiply_add(wv, xv[r], acc[c][r]);
  }
}

template <int C, int R>
inline void multiply_group(const Ints (&w)[C], const float* x, int64_t stride, Vec (&acc)[C][R]) {
  multiply_lanes<C, R, 0>(w, x, stride, acc);
  multiply_lanes<C, R, 1>(w, x, stride, acc);
  multiply_lanes<C, R, 2>(w, x, stride, acc);
  multiply_lanes<C, R, 3>(w, x, stride, acc);
}

// Channels [n, n + C) x rows [m, m + R) of out [rows, channels].
template <typename T, int C, int R>
void tile(const Problem& p, int64_t n, int64_t m, T* out) {
  Vec acc[C][R] = {};
  const int8_t* q = p.q + n * p.k;
  const float* x = p.x + m * p.stride;
  const int64_t whole = p.k / kGroup * kGroup, rest = p.k - whole;
  Ints w[C];
  // The weights of a tile some kPrefetchBytes ahead, asked for now (see kPrefetchBytes).
  const int8_t* ahead = q + std::max<int64_t>(1, kPrefetchBytes / (C * p.k)) * C * p.k;
  for (int64_t g = 0; g < whole; g += kGroup) {
    PS_UNROLLED for (int c = 0; c < C; ++c) {
      __builtin_prefetch(ahead + c * p.k + g, 0, 0);
      std::memcpy(&w[c], q + c * p.k + g, sizeof w[c]);
    }
    multiply_group(w, x + g, p.stride, acc);
  }
  if (rest) {  // the last part-group: weights copied into zeros (x is zero there already)
    for (int c = 0; c < C; ++c) {
      w[c] = Ints{};
      std::memcpy(&w[c], q + c * p.k + whole, rest);
    }
    multiply_group(w, x + whole, p.stride, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      out[(m + r) * p.channels + n + c] = T(sum_lanes<kLanes>(acc[c][r]) * p.scale[n + c]);
}

template <typename T>
using TileFn = void (*)(const Problem&, int64_t, int64_t, T*);

// tiles<T>(...)[c - 1][r - 1]: the tile of c channels x r rows.
template <typename T, int C, int... R>
constexpr std::array<TileFn<T>, kRows> row_tiles(std::integer_sequence<int, R...>) {
  return {&tile<T, C, R + 1>...};
}

template <typename T, int... C>
constexpr std::array<std::array<TileFn<T>, kRows>, kChannels> tiles(
    std::integer_sequence<int, C...>) {
  return {row_tiles<T, C + 1>(std::make_integer_sequence<int, kRows>())...};
}

// Threads take blocks of kChannels output channels, each block every row tile in turn (its
// weights stay in L1 meanwhile).
template <typename T>
void run(const Problem& p, T* out) {
  static constexpr auto table = tiles<T>(std::make_integer_sequence<int, kChannels>());
  const int64_t blocks = (p.channels + kChannels - 1) / kChannels;
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / (kChannels * p.stride * p.rows));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t n = b * kChannels;
      const auto& by_rows = table[std::min<int64_t>(kChannels, p.channels - n) - 1];
      for (int64_t m = 0; m < p.rows; m += kRows)
        by_rows[std::min<int64_t>(kRows, p.rows - m) - 1](p, n, m, out);
    }
  });
}

// `n` values as float32.
template <typename T>
std::vector<float> widened(const T* values, int64_t n) {
  return std::vector<float>(values, values + n);
}

template <typename T>
void int8_linear_as(const at::Tensor& x, const at::Tensor& q, const std::vector<float>& scales,
                    at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1);
  const T* input = x.data_ptr<T>();
  Problem p{nullptr, (k + kGroup - 1) / kGroup * kGroup, q.data_ptr<int8_t>(), scales.data(),
            rows, q.size(0), k};
  std::vector<float> grouped(rows * p.stride, 0.f);  // the rows in group order, zero-padded
  for (int64_t m = 0; m < rows; ++m) {
    float* row = grouped.data() + m * p.stride;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t g = i / kGroup * kGroup, j = i % 4, lane = i % kGroup / 4;
      row[g + j * kLanes + lane] = float(input[m * k + i]);
    }
  }
  p.x = grouped.data();
  run(p, out.data_ptr<T>());
}

}  // namespace

namespace packserve {

// x [M, K] float32 or bfloat16, q [N, K] int8, scale [N] float32 or x's dtype -> [M, N] in
// x's dtype: (x @ q^T) * scale, summed in float32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q,
                          const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1);
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous());
  TORCH_CHECK(q.scalar_type() == at::kChar, "int8 weights");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == x.scalar_type());
  TORCH_CHECK(q.size(1) == x.size(1) && x.size(1) > 0 && scale.size(0) == q.size(0));
  auto out = at::empty({x.size(0), q.size(0)}, x.options());
  if (out.numel() == 0) return out;
  const auto scales = scale.scalar_type() == at::kFloat
                          ? widened(scale.data_ptr<float>(), scale.size(0))
                          : widened(scale.data_ptr<c10::BFloat16>(), scale.size(0));
  if (x.scalar_type() == at::kFloat) {
    int8_linear_as<float>(x, q, scales, out);
  } else {
    int8_linear_as<c10::BFloat16>(x, q, scales, out);
  }
  return out;
}

}  // namespace packserve
