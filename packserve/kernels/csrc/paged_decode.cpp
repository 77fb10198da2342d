// Decode attention that reads the paged KV pool in place (packserve/kernels/native.py builds it).
//
// One new token per sequence attends to its own cached tokens, found through its block table:
// no gathered copy of K/V, no padding to a bucket's length, one call per layer for the whole
// decode batch. Threads split the batch by sequence and each sequence runs start to end on one
// thread in a fixed order, so its result does not depend on what else is in the batch or on the
// thread count. Scores, softmax and the weighted sum are float32 whatever the pool's dtype.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxGroup = 4;  // query heads of one K/V head done together, at most
constexpr int64_t kMaxDim = 256;  // head size, at most

// `n` elements as float32: float32 ones in place, others converted into `room`.
template <typename T>
inline const float* as_float(const T* x, float* room, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) room[i] = float(x[i]);
    return room;
  }
}

// float32 lanes as wide as the CPU's vector registers (GCC / Clang vector extensions): 16 with
// AVX-512, else 8 (wider vectors than the registers make the compiler split the reduction's
// shuffles into scalar moves: on a Zen 3, 256 of the 621 instructions of a score tile).
// Scores are summed kLanes tokens at a time: each token's kLanes partial sums, then one
// transposing reduction for all of them, instead of a horizontal sum per token.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
typedef int32_t LaneIndex __attribute__((vector_size(4 * kLanes)));
typedef uint32_t Wide __attribute__((vector_size(4 * kLanes)));
typedef uint16_t Narrow __attribute__((vector_size(2 * kLanes)));

#if defined(__clang__)
#define PS_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PS_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, LaneIndex{__VA_ARGS__})
#endif

inline Lanes load_lanes(const float* x) {
  Lanes v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

inline Lanes load_lanes(const c10::BFloat16* x) {  // bfloat16 is float32's high half
  Narrow h;
  std::memcpy(&h, x, sizeof h);
  const Wide w = __builtin_convertvector(h, Wide) << 16;
  Lanes v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

template <typename T>  // other dtypes (float16, float64): element by element
inline Lanes load_lanes(const T* x) {
  float room[kLanes];
  for (int i = 0; i < kLanes; ++i) room[i] = float(x[i]);
  return load_lanes(room);
}

// Lane i of the result: the sum of a[i]'s lanes.
inline Lanes sum_each(Lanes* a) {
#if defined(__AVX512F__)
  Lanes b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = PS_SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           PS_SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = PS_SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           PS_SHUFFLE(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = PS_SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           PS_SHUFFLE(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return PS_SHUFFLE(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         PS_SHUFFLE(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  Lanes b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = PS_SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           PS_SHUFFLE(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = PS_SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           PS_SHUFFLE(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  // c[0] holds a[0], a[2], a[1], a[3] two lanes each; c[1] the same of a[4..7].
  return PS_SHUFFLE(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         PS_SHUFFLE(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

#if defined(__AVX512F__)
constexpr int kSumOrder[kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
constexpr int kSumOrder[kLanes] = {0, 2, 1, 3, 4, 6, 5, 7};  // lane i of sum_each holds a[order[i]]
#endif

// Asks the cache for the K (or V) rows of tokens [t0, t0 + n) of the context, every K/V head
// (`row_bytes` each): the rows of a block are contiguous, but blocks lie anywhere in the pool.
template <typename T>
inline void prefetch_tokens(const T* pool, const int64_t* offsets, int64_t length,
                            int64_t row_bytes, int64_t t0, int64_t n) {
  constexpr int64_t kLine = 64;
  for (int64_t t = t0; t < std::min(t0 + n, length); ++t) {
    const char* p = reinterpret_cast<const char*>(pool + offsets[t]);
    for (int64_t b = 0; b < row_bytes; b += kLine) __builtin_prefetch(p + b);
  }
}

// Scores of G query heads (q [G][DIM] scaled, DIM a multiple of 16) against the K/V head at
// `head` of tokens [t0, t0 + n) (n <= kLanes), whose rows start at `offsets`: scores
// [G][length].
template <typename T, int DIM, int G>
inline void score_tile(const T* k_pool, const int64_t* offsets, int64_t length, int64_t head,
                       const float* q, int64_t t0, int64_t n, float* scores) {
  constexpr int kChunks = DIM / kLanes;
  Lanes partial[G][kLanes];
  for (int64_t i = 0; i < kLanes; ++i) {
    if (i >= n) {
      for (int g = 0; g < G; ++g) partial[g][i] = Lanes{};
      continue;
    }
    const T* key = k_pool + offsets[t0 + i] + head;
    Lanes k[kChunks];
    for (int c = 0; c < kChunks; ++c) k[c] = load_lanes(key + kLanes * c);
    for (int g = 0; g < G; ++g) {
      Lanes a = load_lanes(q + g * DIM) * k[0];
      for (int c = 1; c < kChunks; ++c) a += load_lanes(q + g * DIM + kLanes * c) * k[c];
      partial[g][i] = a;
    }
  }
  for (int g = 0; g < G; ++g) {
    const Lanes sums = sum_each(partial[g]);
    for (int i = 0; i < kLanes; ++i)
      if (kSumOrder[i] < n) scores[g * length + t0 + kSumOrder[i]] = sums[i];
  }
}

// The same for a head size known only at run time, or not a multiple of 16: token by token.
template <typename T>
inline void score_rows(const T* k_pool, const int64_t* offsets, int64_t length, int64_t head,
                       const float* q, int g_n, int64_t dim, int64_t t0, int64_t n, float* row,
                       float* scores) {
  for (int64_t t = t0; t < t0 + n; ++t) {
    const float* k = as_float(k_pool + offsets[t] + head, row, dim);
    for (int g = 0; g < g_n; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < dim; ++d) s += q[g * dim + d] * k[d];
      scores[g * length + t] = s;
    }
  }
}

// Per-thread room for one sequence at a time.
struct Scratch {
  std::vector<float> query, acc, inv_sum, scores;
  std::vector<int64_t> offsets;
};

// One sequence: its `heads` query heads (`q` [H, D]) attend over the `length` tokens of its
// block table; writes `out` [H, D]. Each token's pool offset is found once (no division per
// read). Tokens are the outer loop and each token's K (then V) row is read whole, every K/V
// head of it at once, so a block is read in address order (a loop per K/V head would walk the
// context once per head, each time touching a third of every row), with the rows a tile or
// two ahead asked for in advance. DIM > 0: the head size known at compile time; 0: `dim_rt`
// (<= kMaxDim).
template <typename T, int DIM>
void attend_sequence(const T* q, const T* k_pool, const T* v_pool, const int32_t* table,
                     int64_t length, int64_t block_size, int64_t heads, int64_t kv_heads,
                     int64_t dim_rt, float scale, Scratch& room, T* out) {
  const int64_t dim = DIM > 0 ? DIM : dim_rt;
  const int64_t group = heads / kv_heads;
  const int64_t row = kv_heads * dim;  // elements of one token's K (or V) in the pool
  const int64_t row_bytes = row * int64_t(sizeof(T));
  room.query.resize(heads * dim);
  room.acc.assign(heads * dim, 0.f);
  room.inv_sum.resize(heads);
  room.scores.resize(heads * length);
  room.offsets.resize(length);
  float* query = room.query.data();
  float* scores = room.scores.data();
  float* acc = room.acc.data();
  int64_t* offsets = room.offsets.data();
  for (int64_t i = 0; i < heads * dim; ++i) query[i] = float(q[i]) * scale;
  for (int64_t t = 0, block = 0, slot = 0; t < length; ++t) {
    offsets[t] = (int64_t(table[block]) * block_size + slot) * row;
    if (++slot == block_size) slot = 0, ++block;
  }
  float spill[kMaxDim];
  prefetch_tokens(k_pool, offsets, length, row_bytes, 0, kLanes);
  for (int64_t t0 = 0; t0 < length; t0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, length - t0);
    prefetch_tokens(k_pool, offsets, length, row_bytes, t0 + kLanes, kLanes);
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t g = 0; g < group; g += kMaxGroup) {
        const int64_t first = h * group + g;  // query heads [first, first + chunk)
        const float* qs = query + first * dim;
        float* s = scores + first * length;
        const int chunk = int(std::min(kMaxGroup, group - g));
        if constexpr (DIM > 0 && DIM % 16 == 0) {
          switch (chunk) {
            case 1: score_tile<T, DIM, 1>(k_pool, offsets, length, h * dim, qs, t0, n, s); break;
            case 2: score_tile<T, DIM, 2>(k_pool, offsets, length, h * dim, qs, t0, n, s); break;
            case 3: score_tile<T, DIM, 3>(k_pool, offsets, length, h * dim, qs, t0, n, s); break;
            default: score_tile<T, DIM, 4>(k_pool, offsets, length, h * dim, qs, t0, n, s);
          }
        } else {
          score_rows<T>(k_pool, offsets, length, h * dim, qs, chunk, dim, t0, n, spill, s);
        }
      }
    }
  }
  prefetch_tokens(v_pool, offsets, length, row_bytes, 0, 16);
  for (int64_t head = 0; head < heads; ++head) {
    float* s = scores + head * length;
    float peak = s[0];
    for (int64_t t = 1; t < length; ++t) peak = std::max(peak, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < length; ++t) {
      s[t] = std::exp(s[t] - peak);
      sum += s[t];
    }
    room.inv_sum[head] = 1.f / sum;
  }
  for (int64_t t = 0; t < length; ++t) {
    if (t % 8 == 0) prefetch_tokens(v_pool, offsets, length, row_bytes, t + 16, 8);
    const T* v_row = v_pool + offsets[t];
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* v = as_float(v_row + h * dim, spill, dim);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = h * group + g;
        const float p = scores[head * length + t];
        float* a = acc + head * dim;
        for (int64_t d = 0; d < dim; ++d) a[d] += p * v[d];
      }
    }
  }
  for (int64_t head = 0; head < heads; ++head)
    for (int64_t d = 0; d < dim; ++d)
      out[head * dim + d] = T(acc[head * dim + d] * room.inv_sum[head]);
}

template <typename T, int DIM>
void attend(const T* q, const T* k_pool, const T* v_pool, const int32_t* tables,
            const int32_t* lengths, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
            int64_t dim_rt, int64_t max_blocks, int64_t block_size, float scale) {
  const int64_t dim = DIM > 0 ? DIM : dim_rt;
  // Longest first, dealt round-robin to the threads: each gets about the same work.
  std::vector<int64_t> order(batch);
  for (int64_t b = 0; b < batch; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return lengths[x] > lengths[y]; });
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), batch);
  at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t last_thread) {
    Scratch room;
    for (int64_t next = 0; next < batch; ++next) {
      if (next % threads < first_thread || next % threads >= last_thread) continue;
      const int64_t b = order[next];
      attend_sequence<T, DIM>(q + b * heads * dim, k_pool, v_pool, tables + b * max_blocks,
                              lengths[b], block_size, heads, kv_heads, dim, scale, room,
                              out + b * heads * dim);
    }
  });
}

}  // namespace

namespace packserve {

// q [B, H, D]; k_pool, v_pool [slots, Hkv, D] (one layer); tables [B, max_blocks] int32 block
// ids; lengths [B] int32 tokens each attends to (>= 1) -> [B, H, D].
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size,
                        double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes());
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous());
  TORCH_CHECK(tables.is_contiguous() && lengths.is_contiguous());
  TORCH_CHECK(tables.scalar_type() == at::kInt && lengths.scalar_type() == at::kInt);
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == dim && dim <= kMaxDim && heads % kv_heads == 0);
  TORCH_CHECK(tables.size(0) == batch && lengths.size(0) == batch);
  const int32_t* length = lengths.data_ptr<int32_t>();  // checked here: no torch op per call
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(length[b] >= 1, "every sequence attends to one token at least");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto run = dim == 64 ? attend<scalar_t, 64>
             : dim == 128 ? attend<scalar_t, 128>
             : dim == 32 ? attend<scalar_t, 32>
             : attend<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
        tables.data_ptr<int32_t>(), lengths.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), batch,
        heads, kv_heads, dim, tables.size(1), block_size, float(scale));
  });
  return out;
}

}  // namespace packserve
