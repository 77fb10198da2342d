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

struct Context {
  const int32_t* table;  // the sequence's block ids
  int64_t length;        // tokens it attends to
  int64_t block_size;
  int64_t row;  // elements of one token's K (or V) in the pool: Hkv * D

  int64_t offset(int64_t t) const {
    return (int64_t(table[t / block_size]) * block_size + t % block_size) * row;
  }
};

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

// 16 float32 lanes (GCC / Clang vector extensions: the compiler maps them onto the CPU's
// vector registers, whatever their width). Scores are summed 16 tokens at a time: each
// token's 16 partial sums, then one transposing reduction for all 16, instead of a
// horizontal sum per token.
typedef float Lanes __attribute__((vector_size(64)));
typedef int32_t LaneIndex __attribute__((vector_size(64)));
typedef uint32_t Wide __attribute__((vector_size(64)));
typedef uint16_t Narrow __attribute__((vector_size(32)));

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
  float room[16];
  for (int i = 0; i < 16; ++i) room[i] = float(x[i]);
  return load_lanes(room);
}

// Lane i of the result: the sum of a[i]'s lanes.
inline Lanes sum_each(Lanes* a) {
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
}

// Scores of G query heads (q [G][DIM] scaled, DIM a multiple of 16) against the K/V head at
// `head` of each pool row: scores [G][length].
template <typename T, int DIM, int G>
void scores_by_lanes(const Context& ctx, const T* k_pool, int64_t head, const float* q,
                     float* scores) {
  constexpr int kChunks = DIM / 16;
  Lanes query[G][kChunks];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < kChunks; ++c) query[g][c] = load_lanes(q + g * DIM + 16 * c);
  const int64_t length = ctx.length;
  for (int64_t t0 = 0; t0 < length; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - t0);
    Lanes partial[G][16];
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= n) {
        for (int g = 0; g < G; ++g) partial[g][i] = Lanes{};
        continue;
      }
      const T* key = k_pool + ctx.offset(t0 + i) + head;
      Lanes k[kChunks];
      for (int c = 0; c < kChunks; ++c) k[c] = load_lanes(key + 16 * c);
      for (int g = 0; g < G; ++g) {
        Lanes a = query[g][0] * k[0];
        for (int c = 1; c < kChunks; ++c) a += query[g][c] * k[c];
        partial[g][i] = a;
      }
    }
    for (int g = 0; g < G; ++g) {
      const Lanes sums = sum_each(partial[g]);
      for (int64_t i = 0; i < n; ++i) scores[g * length + t0 + i] = sums[i];
    }
  }
}

// G query heads sharing the K/V head whose elements start at `head` in each pool row: their
// scaled queries `query` [G, D] attend over the context; writes their outputs `out` [G, D].
// DIM > 0: the head size known at compile time (the loops unroll); 0: `dim` (<= kMaxDim) at
// run time. `scores`: room for G x length floats.
template <typename T, int DIM, int G>
void attend_group(const Context& ctx, const T* k_pool, const T* v_pool, int64_t head,
                  const float* query, int64_t dim_rt, float* scores, T* out) {
  constexpr int64_t kRoom = DIM > 0 ? DIM : kMaxDim;
  const int64_t dim = DIM > 0 ? DIM : dim_rt;
  const int64_t length = ctx.length;
  float q[G][kRoom], row[kRoom], acc[G][kRoom];
  if constexpr (DIM > 0 && DIM % 16 == 0) {
    scores_by_lanes<T, DIM, G>(ctx, k_pool, head, query, scores);
  } else {
    for (int g = 0; g < G; ++g)
      for (int64_t d = 0; d < dim; ++d) q[g][d] = query[g * dim + d];
    for (int64_t t = 0; t < length; ++t) {
      const float* k = as_float(k_pool + ctx.offset(t) + head, row, dim);
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t d = 0; d < dim; ++d) s += q[g][d] * k[d];
        scores[g * length + t] = s;
      }
    }
  }
  float inv_sum[G];
  for (int g = 0; g < G; ++g) {
    float* s = scores + g * length;
    float peak = s[0];
    for (int64_t t = 1; t < length; ++t) peak = std::max(peak, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < length; ++t) {
      s[t] = std::exp(s[t] - peak);
      sum += s[t];
    }
    inv_sum[g] = 1.f / sum;
  }
  for (int g = 0; g < G; ++g)
    for (int64_t d = 0; d < dim; ++d) acc[g][d] = 0.f;
  for (int64_t t = 0; t < length; ++t) {
    const float* v = as_float(v_pool + ctx.offset(t) + head, row, dim);
    for (int g = 0; g < G; ++g) {
      const float p = scores[g * length + t];
      for (int64_t d = 0; d < dim; ++d) acc[g][d] += p * v[d];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = T(acc[g][d] * inv_sum[g]);
}

template <typename T, int DIM>
void attend(const T* q, const T* k_pool, const T* v_pool, const int32_t* tables,
            const int32_t* lengths, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
            int64_t dim_rt, int64_t max_blocks, int64_t block_size, float scale) {
  const int64_t dim = DIM > 0 ? DIM : dim_rt;
  const int64_t group = heads / kv_heads;
  // Longest first, dealt round-robin to the threads: each gets about the same work.
  std::vector<int64_t> order(batch);
  for (int64_t b = 0; b < batch; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return lengths[x] > lengths[y]; });
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), batch);
  at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t last_thread) {
    std::vector<float> query(heads * dim), scores;
    for (int64_t next = 0; next < batch; ++next) {
      if (next % threads < first_thread || next % threads >= last_thread) continue;
      const int64_t b = order[next];
      const Context ctx{tables + b * max_blocks, lengths[b], block_size, kv_heads * dim};
      scores.resize(kMaxGroup * ctx.length);
      for (int64_t i = 0; i < heads * dim; ++i) query[i] = float(q[b * heads * dim + i]) * scale;
      for (int64_t h = 0; h < kv_heads; ++h) {
        for (int64_t g = 0; g < group; g += kMaxGroup) {
          const int64_t first = h * group + g;  // query heads [first, first + n)
          const float* qs = query.data() + first * dim;
          T* os = out + (b * heads + first) * dim;
          float* ss = scores.data();
          switch (std::min(kMaxGroup, group - g)) {
            case 1: attend_group<T, DIM, 1>(ctx, k_pool, v_pool, h * dim, qs, dim, ss, os); break;
            case 2: attend_group<T, DIM, 2>(ctx, k_pool, v_pool, h * dim, qs, dim, ss, os); break;
            case 3: attend_group<T, DIM, 3>(ctx, k_pool, v_pool, h * dim, qs, dim, ss, os); break;
            default: attend_group<T, DIM, 4>(ctx, k_pool, v_pool, h * dim, qs, dim, ss, os);
          }
        }
      }
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
