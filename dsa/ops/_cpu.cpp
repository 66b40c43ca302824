// CPU kernels of DSA, loaded by dsa/ops/_cpu.py. Inference only: none of them has a backward pass.
//
// index_scores: fused lightning indexer scores, score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]).
// The PyTorch path writes the per-head logits [Tc * HI, S] to memory, reads them back for the ReLU,
// and again for the head-weighted sum. At SmolLM2's indexer shape (HI 4, DI 32) those passes, not the
// multiplications, set its speed. Here each block of keys stays in registers from the q . k product to
// the weighted sum, and only the scores [Tc, S] are written.
//
// Each work item packs a block of KEY_BLOCK keys as [DI, KEY_BLOCK], so that one vector contains one
// dimension of consecutive keys, and keeps it in L1 while every query of the chunk reads it. The keys
// arrive as k_t [B, DI, S], either with unit stride along S or as the transposed view of the cache's
// own [B, S, DI] (unit stride along DI). The packing transposes the latter, so no copy of all S keys
// is needed. Written with GCC vector extensions, so the compiler picks the instructions the machine has
// (AVX-512 or AVX2); the Python loader compiles it with -march=native.
//
// select_rows: each row's top-k keys under the reference's tie rule, found among the keys at or above a
// bound taken from a sample of the row (see the comment above that function).
//
// select_chunk: a prefill chunk's selection that keeps each row's candidates instead of the chunk's
// scores (see the comment above that function).
//
// select_few: a decode step's selection in one call, scoring the indexer key cache in its own [B, S, DI]
// layout, one key row against every (query, head) pair, then selecting each row as select_rows does.
//
// sparse_attention: each query attends only the keys its index row lists, read in place from the
// key/value cache (see the comment above that function). A decode row's keys are split over the threads.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <climits>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <cstring>

namespace {

using vec = float __attribute__((vector_size(64)));  // 16 lanes
constexpr int64_t LANES = 16;
constexpr int64_t VECS = 2;                  // vectors per head and key group
constexpr int64_t GROUP = LANES * VECS;      // keys per register block
constexpr int64_t KEY_BLOCK = 4 * GROUP;     // keys per parallel work item
constexpr int64_t QUERY_BLOCK = 3;           // queries per register block

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

using uvec = uint32_t __attribute__((vector_size(64)));

// Rounds each lane to the nearest bf16 value (ties to even), kept as fp32: what a bf16 matrix product
// returns for a logit it summed in fp32.
inline vec round_bf16(vec x) {
  uvec bits;
  std::memcpy(&bits, &x, sizeof(vec));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &bits, sizeof(vec));
  return x;
}

// For QB queries, adds sum over NH heads of w[h] * relu(q[h] . k[:, group]) to score (GROUP keys each).
// q is packed [DI][HI][QB] (see pack_queries) and points at the first of the NH heads. w[j * w_stride + h]
// is query j's weight of head h. k contains head_dim rows, row d at k + d * k_stride. One load of a key
// vector serves QB * NH products.
template <int QB, int NH, bool ROUND>
inline void add_heads(const float* q, int64_t heads, int64_t head_dim, const float* k, int64_t k_stride,
                      const float* w, int64_t w_stride, vec (&score)[QB][VECS]) {
  vec acc[QB][NH][VECS];
  for (int j = 0; j < QB; ++j)
    for (int h = 0; h < NH; ++h)
      for (int v = 0; v < VECS; ++v) acc[j][h][v] = vec{};
  for (int64_t d = 0; d < head_dim; ++d) {
    vec kd[VECS];
    for (int v = 0; v < VECS; ++v) kd[v] = load(k + d * k_stride + v * LANES);
    const float* q_d = q + d * heads * QB;
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < QB; ++j) {
        const float qv = q_d[h * QB + j];
        for (int v = 0; v < VECS; ++v) acc[j][h][v] += qv * kd[v];
      }
  }
  const vec zero{};
  for (int j = 0; j < QB; ++j)
    for (int h = 0; h < NH; ++h)
      for (int v = 0; v < VECS; ++v) {
        const vec logit = ROUND ? round_bf16(acc[j][h][v]) : acc[j][h][v];
        score[j][v] += w[j * w_stride + h] * (logit > zero ? logit : zero);
      }
}

// Computes the scores of QB queries (packed [DI][HI][QB] at q) against GROUP keys starting at k (rows
// of stride k_stride). Query j's scores go to out + j * out_stride.
template <int QB, bool ROUND>
inline void score_group(const float* q, const float* w, int64_t heads, int64_t head_dim, const float* k,
                        int64_t k_stride, float* out, int64_t out_stride) {
  vec score[QB][VECS];
  for (int j = 0; j < QB; ++j)
    for (int v = 0; v < VECS; ++v) score[j][v] = vec{};
  int64_t h = 0;
  for (; h + 4 <= heads; h += 4) add_heads<QB, 4, ROUND>(q + h * QB, heads, head_dim, k, k_stride, w + h, heads, score);
  for (; h + 2 <= heads; h += 2) add_heads<QB, 2, ROUND>(q + h * QB, heads, head_dim, k, k_stride, w + h, heads, score);
  for (; h < heads; ++h) add_heads<QB, 1, ROUND>(q + h * QB, heads, head_dim, k, k_stride, w + h, heads, score);
  for (int j = 0; j < QB; ++j)
    for (int v = 0; v < VECS; ++v) store(out + j * out_stride + v * LANES, score[j][v]);
}

// Lane indices of one level of transpose16 (see there): lanes of the first and the second row of a pair.
template <int B>
constexpr int first_row_lane(int lane) { return (lane / B) % 2 == 0 ? lane : LANES + lane - B; }
template <int B>
constexpr int second_row_lane(int lane) { return (lane / B) % 2 == 0 ? lane + B : LANES + lane; }

#define DSA_SHUFFLE16(F, a, b) \
  __builtin_shufflevector(a, b, F(0), F(1), F(2), F(3), F(4), F(5), F(6), F(7), F(8), F(9), F(10), F(11), \
                          F(12), F(13), F(14), F(15))

// Swaps the off-diagonal B x B blocks of every 2B x 2B diagonal block of the 16 x 16 matrix in r.
template <int B>
inline void swap_blocks(vec (&r)[LANES]) {
  for (int i = 0; i < LANES; ++i)
    if ((i / B) % 2 == 0) {
      const vec x = r[i], y = r[i + B];
      r[i] = DSA_SHUFFLE16(first_row_lane<B>, x, y);
      r[i + B] = DSA_SHUFFLE16(second_row_lane<B>, x, y);
    }
}

// Transposes the 16 x 16 matrix whose rows are r[0 .. 16): the transpose swaps the off-diagonal halves,
// then transposes each half in place, down to 1 x 1 blocks.
inline void transpose16(vec (&r)[LANES]) {
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
}

// Packs count keys of a keys-major block (key i's DI floats at k + i * k_stride) as [DI][KEY_BLOCK] at
// out: 16 x 16 tiles transposed in registers, the rest one float at a time.
inline void pack_keys_major(const float* k, int64_t k_stride, int64_t count, int64_t head_dim, float* out) {
  const int64_t full = head_dim % LANES == 0 ? count / LANES * LANES : 0;
  for (int64_t i0 = 0; i0 < full; i0 += LANES)
    for (int64_t d0 = 0; d0 < head_dim; d0 += LANES) {
      vec tile[LANES];
      for (int j = 0; j < LANES; ++j) tile[j] = load(k + (i0 + j) * k_stride + d0);
      transpose16(tile);
      for (int m = 0; m < LANES; ++m) store(out + (d0 + m) * KEY_BLOCK + i0, tile[m]);
    }
  for (int64_t d = 0; d < head_dim; ++d)
    for (int64_t i = full; i < count; ++i) out[d * KEY_BLOCK + i] = k[i * k_stride + d];
}

// Copies qb queries q[t .. t + qb) [HI, DI] into out as [DI][HI][qb], so that the QB * NH values a key
// vector meets at one dimension lie next to each other.
inline void pack_queries(const float* q, int64_t qb, int64_t heads, int64_t head_dim, float* out) {
  for (int64_t j = 0; j < qb; ++j)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < head_dim; ++d) out[(d * heads + h) * qb + j] = q[(j * heads + h) * head_dim + d];
}

}  // namespace

namespace {

// Location and strides of the keys k_t [B, DI, S] of index_scores and select_chunk: fp32 or bf16 (then
// f32 is null), with unit stride along S or along DI (the transposed view of a keys-major cache).
struct KeySource {
  const float* f32;
  const at::BFloat16* bf16;
  int64_t batch_stride, dim_stride, key_stride, head_dim;
};

KeySource key_source(const torch::Tensor& k_t) {
  const bool round = k_t.dtype() == torch::kBFloat16;
  return KeySource{round ? nullptr : k_t.data_ptr<float>(), round ? k_t.data_ptr<at::BFloat16>() : nullptr,
                   k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.size(1)};
}

// Packs count <= KEY_BLOCK keys of batch b, key i at position start + i * step, as [DI][KEY_BLOCK] at
// packed, zero past count. Rows of a [DI, S] layout lie S floats apart, so read in place, a
// power-of-two S would map all DI rows of a block to the same L1 cache sets. Keys-major rows are
// transposed in 16 x 16 tiles.
void pack_keys(const KeySource& src, int64_t b, int64_t start, int64_t step, int64_t count, float* packed) {
  const int64_t head_dim = src.head_dim;
  if (count < KEY_BLOCK) std::fill(packed, packed + head_dim * KEY_BLOCK, 0.0f);
  const int64_t offset = b * src.batch_stride + start * src.key_stride;
  const int64_t key_stride = src.key_stride * step;
  if (src.bf16 != nullptr) {
    const at::BFloat16* k = src.bf16 + offset;
    for (int64_t d = 0; d < head_dim; ++d)
      for (int64_t i = 0; i < count; ++i)
        packed[d * KEY_BLOCK + i] = static_cast<float>(k[d * src.dim_stride + i * key_stride]);
    return;
  }
  const float* k = src.f32 + offset;
  if (src.dim_stride == 1) {
    pack_keys_major(k, key_stride, count, head_dim, packed);
  } else if (key_stride == 1) {
    for (int64_t d = 0; d < head_dim; ++d) std::memcpy(packed + d * KEY_BLOCK, k + d * src.dim_stride, count * sizeof(float));
  } else {
    for (int64_t d = 0; d < head_dim; ++d)
      for (int64_t i = 0; i < count; ++i) packed[d * KEY_BLOCK + i] = k[d * src.dim_stride + i * key_stride];
  }
}

// Queries q [B, Tc, HI, DI] packed per block of QUERY_BLOCK (the remainder one by one), at the same
// offsets as in q (see pack_queries).
std::vector<float> pack_all_queries(const float* q, int64_t batch, int64_t queries, int64_t heads, int64_t head_dim) {
  std::vector<float> packed(static_cast<size_t>(batch * queries * heads * head_dim));
  const int64_t full_queries = queries / QUERY_BLOCK * QUERY_BLOCK;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < queries; t += t < full_queries ? QUERY_BLOCK : 1) {
      const int64_t offset = (b * queries + t) * heads * head_dim;
      pack_queries(q + offset, t < full_queries ? QUERY_BLOCK : 1, heads, head_dim, packed.data() + offset);
    }
  return packed;
}

// Scores of every query of one batch entry (q packed by pack_all_queries, weights w [Tc, HI]) against
// the first `groups` groups of a packed key block: query t's scores go to dest + t * dest_stride.
void score_block(const float* q, const float* w, int64_t queries, int64_t heads, int64_t head_dim, bool round,
                 const float* packed, int64_t groups, float* dest, int64_t dest_stride) {
  const int64_t full_queries = queries / QUERY_BLOCK * QUERY_BLOCK;
  int64_t t = 0;
  for (; t < full_queries; t += QUERY_BLOCK)
    for (int64_t g = 0; g < groups; ++g) {
      const float* q_t = q + t * heads * head_dim;
      float* out_t = dest + t * dest_stride + g * GROUP;
      if (round)
        score_group<QUERY_BLOCK, true>(q_t, w + t * heads, heads, head_dim, packed + g * GROUP, KEY_BLOCK, out_t, dest_stride);
      else
        score_group<QUERY_BLOCK, false>(q_t, w + t * heads, heads, head_dim, packed + g * GROUP, KEY_BLOCK, out_t, dest_stride);
    }
  for (; t < queries; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      const float* q_t = q + t * heads * head_dim;
      float* out_t = dest + t * dest_stride + g * GROUP;
      if (round)
        score_group<1, true>(q_t, w + t * heads, heads, head_dim, packed + g * GROUP, KEY_BLOCK, out_t, dest_stride);
      else
        score_group<1, false>(q_t, w + t * heads, heads, head_dim, packed + g * GROUP, KEY_BLOCK, out_t, dest_stride);
    }
}

// Checks the arguments of index_scores and select_chunk; returns q and w contiguous.
std::pair<torch::Tensor, torch::Tensor> check_score_inputs(const char* name, torch::Tensor q, const torch::Tensor& k_t,
                                                           torch::Tensor w) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, name, " expects fp32 q and w");
  TORCH_CHECK(k_t.dtype() == torch::kFloat32 || k_t.dtype() == torch::kBFloat16, name, " expects fp32 or bf16 k_t");
  TORCH_CHECK(q.dim() == 4 && k_t.dim() == 3 && w.dim() == 3, name, " expects q [B, Tc, HI, DI], k_t [B, DI, S] and w [B, Tc, HI]");
  TORCH_CHECK(k_t.stride(2) == 1 || k_t.stride(1) == 1, name, " expects k_t with unit stride along S or DI");
  TORCH_CHECK(k_t.size(0) == q.size(0) && k_t.size(1) == q.size(3) && w.size(0) == q.size(0) && w.size(1) == q.size(1) &&
                  w.size(2) == q.size(2),
              name, " got mismatched shapes");
  return {q.contiguous(), w.contiguous()};
}

}  // namespace

// q [B, Tc, HI, DI] fp32, k_t [B, DI, S] fp32 or bf16 (stride 1 along S or along DI), w [B, Tc, HI] fp32
// already scaled. Returns scores [B, Tc, S] fp32. With bf16 keys the product is a bf16 product's: q must
// hold bf16 values (the caller rounds it), the sum runs in fp32 and each logit is rounded to bf16 before
// the ReLU.
torch::Tensor index_scores(torch::Tensor q_in, torch::Tensor k_t, torch::Tensor w_in) {
  auto [q, w] = check_score_inputs("index_scores", q_in, k_t, w_in);
  const bool round = k_t.dtype() == torch::kBFloat16;
  const int64_t batch = q.size(0), queries = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t keys = k_t.size(2);
  auto out = torch::empty({batch, queries, keys}, q.options());
  const KeySource src = key_source(k_t);
  const float* w_ptr = w.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t blocks = (keys + KEY_BLOCK - 1) / KEY_BLOCK;
  const std::vector<float> q_packed = pack_all_queries(q.data_ptr<float>(), batch, queries, heads, head_dim);

  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> packed(static_cast<size_t>(head_dim * KEY_BLOCK));
    std::vector<float> tail_out(static_cast<size_t>(queries * KEY_BLOCK));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks;
      const int64_t first = (item % blocks) * KEY_BLOCK;
      const int64_t count = std::min(KEY_BLOCK, keys - first);
      pack_keys(src, b, first, 1, count, packed.data());
      // Scores of a partial block go to a buffer first, so that no store passes the row's end.
      float* dest = count == KEY_BLOCK ? out_ptr + b * queries * keys + first : tail_out.data();
      const int64_t dest_stride = count == KEY_BLOCK ? keys : KEY_BLOCK;
      score_block(q_packed.data() + b * queries * heads * head_dim, w_ptr + b * queries * heads, queries, heads,
                  head_dim, round, packed.data(), (count + GROUP - 1) / GROUP, dest, dest_stride);
      if (count < KEY_BLOCK)
        for (int64_t t = 0; t < queries; ++t)
          std::memcpy(out_ptr + (b * queries + t) * keys + first, tail_out.data() + t * KEY_BLOCK,
                      count * sizeof(float));
    }
  });
  return out;
}

namespace {

using ivec = int32_t __attribute__((vector_size(64)));

// exp(x) for 16 lanes, x <= 0 (softmax after subtracting the row maximum). Its relative error is about
// 2e-7, estimated from the polynomial's remainder. The tests compare the attention output with the
// reference, whose softmax is PyTorch's, within 1e-5.
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial to degree 7, 2^n in the exponent bits.
inline vec exp_nonpositive(vec x) {
  const vec lowest = vec{} - 87.0f;  // below this 2^n leaves the normal range
  x = x < lowest ? lowest : x;
  const vec t = x * 1.44269504088896341f;
  const vec half = vec{} + 0.5f;
  const ivec n = __builtin_convertvector(t - half, ivec);  // t <= 0: truncation of t - 1/2 rounds
  const vec fn = __builtin_convertvector(n, vec);
  const vec r = x - fn * 0.693145751953125f - fn * 1.428606765330187e-06f;
  vec p = vec{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(vec));
  return p * scale;
}

// Sum of the 16 lanes by halving: four shuffles and adds, where a lane-by-lane loop takes sixteen adds in
// a chain.
inline float hsum(vec v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// Sums each of the four vectors a, b, c, d: returns a vector whose lanes 0, 4, 8 and 12 hold the four sums.
// Two-source shuffles halve the vectors twice, so four sums cost six shuffles where four hsum calls
// cost sixteen.
inline vec hsum4(vec a, vec b, vec c, vec d) {
  const vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vec x = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
          __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return x;
}

// The largest divisor of n that is at most cap (at least 1).
constexpr int largest_divisor_at_most(int n, int cap) {
  for (int d = cap < n ? cap : n; d > 1; --d)
    if (n % d == 0) return d;
  return 1;
}

// Rows of the cache are read this many keys ahead of their use, so that the loads of a gathered row
// overlap with the work on earlier ones. Index sets of random keys miss every cache, and without the
// hint a core waits for each row in turn.
constexpr int64_t PREFETCH_DISTANCE = 8;

template <int DV>
inline void prefetch_row(const float* row) {
  for (int c = 0; c < DV; ++c) __builtin_prefetch(row + c * LANES);
}

// One query row and one kv head: the G query heads q (G rows of DV vectors, already scaled) attend the
// keys listed in idx[0 .. count). probs is scratch of G * count floats; out receives G rows of DV vectors.
// With row_max null, out is the attention output. Otherwise out receives the unnormalised sum
// sum_i exp(s_i - m) v_i of each head, row_max its maximum logit m and row_sum its sum_i exp(s_i - m).
// The caller then merges the parts of one index row (see the merge in sparse_attention_impl).
//
// Register blocking: the logits pass takes HG heads at a time and the value pass CB vectors of each
// value row at a time, so that the accumulators and the query vectors they use fit in 16 vector
// registers. Qwen3-4B's G 4 x D 128 would need 32 for either pass at once, and spill.
template <int G, int DV>
void attend_row(const vec (&q)[G][DV], const int64_t* idx, int64_t count, const float* k, int64_t k_stride,
                const float* v, int64_t v_stride, float* probs, float* out, float* row_max = nullptr,
                float* row_sum = nullptr) {
  constexpr int HG = largest_divisor_at_most(G, 16 / DV > 1 ? 16 / DV : 1);
  constexpr int CB = largest_divisor_at_most(DV, 16 / G > 1 ? 16 / G : 1);
  float max_s[G];
  for (int h = 0; h < G; ++h) max_s[h] = -__builtin_inff();
  // Logits of four keys at a time: hsum4 reduces the four accumulators of one head in six shuffles,
  // where four hsum calls take sixteen. HG4 heads at a time keep 4 * HG4 accumulators, HG4 * DV query
  // vectors and DV key vectors within the 32 vector registers of AVX-512.
  constexpr int HG4 = largest_divisor_at_most(G, (28 - DV) / (4 + DV) > 1 ? (28 - DV) / (4 + DV) : 1);
  const int64_t fours = count / 4 * 4;
  for (int h0 = 0; h0 < G; h0 += HG4)
    for (int64_t i = 0; i < fours; i += 4) {
      vec acc[4][HG4];
      for (int j = 0; j < 4; ++j) {
        if (i + j + PREFETCH_DISTANCE < count) prefetch_row<DV>(k + idx[i + j + PREFETCH_DISTANCE] * k_stride);
        const float* k_row = k + idx[i + j] * k_stride;
        for (int h = 0; h < HG4; ++h) acc[j][h] = vec{};
        for (int c = 0; c < DV; ++c) {
          const vec kc = load(k_row + c * LANES);
          for (int h = 0; h < HG4; ++h) acc[j][h] += q[h0 + h][c] * kc;
        }
      }
      for (int h = 0; h < HG4; ++h) {
        const vec sums = hsum4(acc[0][h], acc[1][h], acc[2][h], acc[3][h]);
        float* p = probs + (h0 + h) * count + i;
        for (int j = 0; j < 4; ++j) {
          p[j] = sums[4 * j];
          max_s[h0 + h] = std::max(max_s[h0 + h], sums[4 * j]);
        }
      }
    }
  for (int h0 = 0; h0 < G; h0 += HG)
    for (int64_t i = fours; i < count; ++i) {
      const float* k_row = k + idx[i] * k_stride;
      vec acc[HG];
      for (int h = 0; h < HG; ++h) acc[h] = vec{};
      for (int c = 0; c < DV; ++c) {
        const vec kc = load(k_row + c * LANES);
        for (int h = 0; h < HG; ++h) acc[h] += q[h0 + h][c] * kc;
      }
      for (int h = 0; h < HG; ++h) {
        const float s = hsum(acc[h]);
        probs[(h0 + h) * count + i] = s;
        max_s[h0 + h] = std::max(max_s[h0 + h], s);
      }
    }
  float total_s[G];
  for (int h = 0; h < G; ++h) {
    float* p = probs + h * count;
    const vec m = vec{} + max_s[h];
    vec sum = vec{};
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES) {
      const vec e = exp_nonpositive(load(p + i) - m);
      store(p + i, e);
      sum += e;
    }
    float total = hsum(sum);
    if (i < count) {
      vec tail_in = vec{};
      std::memcpy(&tail_in, p + i, (count - i) * sizeof(float));
      const vec e = exp_nonpositive(tail_in - m);
      for (int64_t j = 0; j < count - i; ++j) {
        p[i + j] = e[j];
        total += e[j];
      }
    }
    total_s[h] = total;
  }
  for (int c0 = 0; c0 < DV; c0 += CB) {
    vec acc[G][CB];
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < CB; ++c) acc[h][c] = vec{};
    for (int64_t i = 0; i < count; ++i) {
      if (i + PREFETCH_DISTANCE < count) prefetch_row<CB>(v + idx[i + PREFETCH_DISTANCE] * v_stride + c0 * LANES);
      const float* v_row = v + idx[i] * v_stride + c0 * LANES;
      for (int c = 0; c < CB; ++c) {
        const vec vc = load(v_row + c * LANES);
        for (int h = 0; h < G; ++h) acc[h][c] += probs[h * count + i] * vc;
      }
    }
    for (int h = 0; h < G; ++h) {
      const float factor = row_max == nullptr ? 1.0f / total_s[h] : 1.0f;
      for (int c = 0; c < CB; ++c) store(out + (h * DV + c0 + c) * LANES, acc[h][c] * factor);
    }
  }
  if (row_max != nullptr)
    for (int h = 0; h < G; ++h) {
      row_max[h] = max_s[h];
      row_sum[h] = total_s[h];
    }
}

// Index rows of int32 or int64 keys, as the caller passed them. The fused prefill's buffer is int32.
struct IndexRows {
  const void* ptr;
  bool narrow;  // int32 entries
  int64_t slots;
};

IndexRows index_rows(const torch::Tensor& indices) {
  const bool narrow = indices.scalar_type() == torch::kInt32;
  return {narrow ? static_cast<const void*>(indices.data_ptr<int32_t>()) : indices.data_ptr<int64_t>(), narrow,
          indices.size(2)};
}

template <typename I>
inline int64_t list_valid(const I* idx, int64_t slots, int64_t* valid) {
  int64_t count = 0;
  for (int64_t i = 0; i < slots; ++i)
    if (idx[i] >= 0) valid[count++] = idx[i];
  return count;
}

// Lists the valid (non-negative) entries of index row `row` in valid; returns how many there are.
inline int64_t list_valid(const IndexRows& rows, int64_t row, int64_t* valid) {
  if (rows.narrow) return list_valid(static_cast<const int32_t*>(rows.ptr) + row * rows.slots, rows.slots, valid);
  return list_valid(static_cast<const int64_t*>(rows.ptr) + row * rows.slots, rows.slots, valid);
}

inline void load_query(const float* q, int g_heads, int dv, float scale, vec* out) {
  for (int h = 0; h < g_heads; ++h)
    for (int c = 0; c < dv; ++c) out[h * dv + c] = load(q + (h * dv + c) * LANES) * scale;
}

// Index rows of at least this many slots are split across threads when there are too few rows (decode).
constexpr int64_t SPLIT_MIN_SLOTS = 512;

template <int G, int DV>
void sparse_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& indices, float scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), queries = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(2), slots = indices.size(2);
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k.data_ptr<float>();
  const float* v_ptr = v.data_ptr<float>();
  const IndexRows idx_rows = index_rows(indices);
  float* out_ptr = out.data_ptr<float>();
  const int64_t items = batch * queries * kv_heads;
  const int64_t threads = at::get_num_threads();
  // A decode step has one row per batch entry: with fewer (row, kv head) pairs than two per thread,
  // each row's keys are split into parts that run in parallel and are merged afterwards.
  int64_t parts = 1;
  if (items < 2 * threads && slots >= 2 * SPLIT_MIN_SLOTS)
    parts = std::min((2 * threads + items - 1) / items, slots / SPLIT_MIN_SLOTS);
  if (parts > 1) {
    // Per (row, kv head, part): G unnormalised output rows, G maxima and G sums.
    std::vector<float> part_out(static_cast<size_t>(items * parts * G * head_dim));
    std::vector<float> part_max(static_cast<size_t>(items * parts * G)), part_sum(part_max.size());
    at::parallel_for(0, items * parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> valid(static_cast<size_t>(slots));
      std::vector<float> probs(static_cast<size_t>(G * slots));
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t item = unit / parts, part = unit % parts;
        const int64_t row = item / kv_heads, g = item % kv_heads, b = row / queries;
        const int64_t count = list_valid(idx_rows, row, valid.data());
        const int64_t first = count * part / parts, last = count * (part + 1) / parts;
        float* m = part_max.data() + unit * G;
        float* l = part_sum.data() + unit * G;
        float* o = part_out.data() + unit * G * head_dim;
        if (first == last) {  // an empty part adds nothing to the merge
          std::fill(m, m + G, -__builtin_inff());
          std::fill(l, l + G, 0.0f);
          std::fill(o, o + G * head_dim, 0.0f);
          continue;
        }
        vec q_row[G][DV];
        load_query(q_ptr + (row * heads + g * G) * head_dim, G, DV, scale, &q_row[0][0]);
        attend_row<G, DV>(q_row, valid.data() + first, last - first, k_ptr + b * k.stride(0) + g * k.stride(2),
                          k.stride(1), v_ptr + b * v.stride(0) + g * v.stride(2), v.stride(1), probs.data(), o, m, l);
      }
    });
    // Merge: out = sum_p exp(m_p - M) o_p / sum_p exp(m_p - M) l_p, M the largest m_p.
    for (int64_t item = 0; item < items; ++item)
      for (int h = 0; h < G; ++h) {
        const int64_t row = item / kv_heads, g = item % kv_heads;
        float* dest = out_ptr + (row * heads + g * G + h) * head_dim;
        float top = -__builtin_inff();
        for (int64_t p = 0; p < parts; ++p) top = std::max(top, part_max[(item * parts + p) * G + h]);
        std::fill(dest, dest + head_dim, 0.0f);
        if (top == -__builtin_inff()) continue;  // no key: the row's output is 0, as in the reference
        float denominator = 0.0f;
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t unit = item * parts + p;
          const float factor = std::exp(part_max[unit * G + h] - top);
          denominator += factor * part_sum[unit * G + h];
          const float* o = part_out.data() + (unit * G + h) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) dest[d] += factor * o[d];
        }
        for (int64_t d = 0; d < head_dim; ++d) dest[d] /= denominator;
      }
    return;
  }
  // One work item is one query row and one kv head. Items run tile by tile: ROW_TILE consecutive rows of
  // kv head 0, then the same rows of kv head 1, and so on. Neighbouring queries often select the same
  // keys, and this order reads those rows again while they are still in the core's L2 cache, where a
  // row-major order would read the other kv heads' rows in between.
  constexpr int64_t ROW_TILE = 16;
  const int64_t rows = batch * queries;
  const int64_t tile_items = ROW_TILE * kv_heads;
  const int64_t padded_items = (rows + ROW_TILE - 1) / ROW_TILE * tile_items;
  const int64_t grain = items >= 8 * threads ? 8 : 1;
  at::parallel_for(0, padded_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> valid(static_cast<size_t>(slots));
    std::vector<float> probs(static_cast<size_t>(G * slots));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / tile_items, in_tile = item % tile_items;
      const int64_t g = in_tile / ROW_TILE, row = tile * ROW_TILE + in_tile % ROW_TILE;
      if (row >= rows) continue;  // past the last row of a partial tile
      const int64_t b = row / queries;
      const int64_t count = list_valid(idx_rows, row, valid.data());
      float* out_head = out_ptr + (row * heads + g * G) * head_dim;
      if (count == 0) {  // no key: the row's output is 0, as in the reference
        std::fill(out_head, out_head + G * head_dim, 0.0f);
        continue;
      }
      vec q_row[G][DV];
      load_query(q_ptr + (row * heads + g * G) * head_dim, G, DV, scale, &q_row[0][0]);
      attend_row<G, DV>(q_row, valid.data(), count, k_ptr + b * k.stride(0) + g * k.stride(2), k.stride(1),
                        v_ptr + b * v.stride(0) + g * v.stride(2), v.stride(1), probs.data(), out_head);
    }
  });
}

}  // namespace

// Sparse attention forward, fp32. q is [B, T, H, D] (made contiguous). k and v are [B, S, HKV, D] with unit
// stride along D and any other strides, such as a transposed [B, HKV, S, D] cache. indices is [B, T, K] int64
// or int32 with -1 in empty slots. Query head h reads kv head h / G, G = H / HKV. Supported: G in 1..4 and 8, D in 64
// and 128. sparse_attention_cpu_applies() in dsa/ops/sparse_attention/cpu.py checks this before calling.
torch::Tensor sparse_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor indices,
                               double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "sparse_attention expects fp32 q, k and v");
  TORCH_CHECK(indices.dtype() == torch::kInt64 || indices.dtype() == torch::kInt32,
              "sparse_attention expects int64 or int32 indices");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "sparse_attention expects unit stride along D");
  q = q.contiguous();
  indices = indices.contiguous();
  auto out = torch::empty_like(q);
  const int64_t groups = q.size(2) / k.size(2), head_dim = q.size(3);
  const float s = static_cast<float>(scale);
#define DSA_ATTEND_CASE(G, D)                                        \
  if (groups == G && head_dim == D) {                                \
    sparse_attention_impl<G, D / LANES>(q, k, v, indices, s, out);   \
    return out;                                                      \
  }
  DSA_ATTEND_CASE(1, 64) DSA_ATTEND_CASE(2, 64) DSA_ATTEND_CASE(3, 64) DSA_ATTEND_CASE(4, 64) DSA_ATTEND_CASE(8, 64)
  DSA_ATTEND_CASE(1, 128) DSA_ATTEND_CASE(2, 128) DSA_ATTEND_CASE(3, 128) DSA_ATTEND_CASE(4, 128)
  DSA_ATTEND_CASE(8, 128)
#undef DSA_ATTEND_CASE
  TORCH_CHECK(false, "sparse_attention supports G = H / HKV in 1-4 and 8 and D in 64 and 128; got G = ", groups,
              " and D = ", head_dim);
}

namespace {

constexpr int64_t SAMPLE_STRIDE = 16;  // every 16th score forms a row's sample
constexpr int64_t SAMPLED_MIN_SPAN = 3;  // rows of at least 3 * count keys are sampled

// Scratch of select_row for rows of up to `span` keys (fewer than 2^31): candidate keys, their scores in
// key order, the row's sample (every SAMPLE_STRIDE-th score), and the values kth_largest reorders.
struct RowScratch {
  explicit RowScratch(int64_t span)
      : idx(static_cast<size_t>(span)), val(static_cast<size_t>(span)),
        sample(static_cast<size_t>((span + SAMPLE_STRIDE - 1) / SAMPLE_STRIDE)), bucket(static_cast<size_t>(span)) {}
  std::vector<int32_t> idx;
  std::vector<float> val, sample, bucket;
};

// Maps a float to an unsigned integer of the same order (for the floats other than NaN; -0 sorts below +0).
inline uint32_t ordered_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

constexpr int RADIX_BITS = 11;

// Returns the k-th largest (1-based) of values[0 .. n), 1 <= k <= n, leaving values unchanged. bucket is
// scratch of n floats. One pass finds the range of the values' ordered bits, a second counts them in 2^11
// buckets of that range, and nth_element runs only on the values of the bucket that contains the k-th
// largest. On a row's candidates that bucket contains a few dozen values, where nth_element over all of them
// cost most of the selection.
float kth_largest(const float* values, int64_t n, int64_t k, float* bucket) {
  uint32_t low = UINT32_MAX, high = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = ordered_bits(values[i]);
    low = std::min(low, bits);
    high = std::max(high, bits);
  }
  if (low == high) return values[0];
  const uint32_t range = high - low;
  const int shift = std::max(0, 32 - __builtin_clz(range) - RADIX_BITS);
  uint32_t counts[1 << RADIX_BITS] = {};
  for (int64_t i = 0; i < n; ++i) ++counts[(ordered_bits(values[i]) - low) >> shift];
  // The bucket of the k-th largest, scanning from the largest values down.
  int64_t above = 0;
  int64_t target = range >> shift;
  for (; target > 0 && above + counts[target] < k; --target) above += counts[target];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float value = values[i];
    bucket[m] = value;
    m += static_cast<int64_t>((ordered_bits(value) - low) >> shift) == target;
  }
  const int64_t need = k - above;  // the need-th largest within the bucket
  std::nth_element(bucket, bucket + (need - 1), bucket + m, std::greater<float>());
  return bucket[need - 1];
}

// Writes the `count` selected keys among n candidates (keys cand_idx in ascending order, scores cand_val)
// to out: every candidate above the count-th largest score, then the lowest-index ones equal to it,
// then -1 in the slots left. -inf scores are never selected. bucket is scratch of n floats.
template <typename I>
void select_candidates(const int32_t* cand_idx, const float* cand_val, int64_t n, int64_t count, float* bucket,
                       I* out) {
  const int64_t k = std::min(count, n);
  const float kth = kth_largest(cand_val, n, k, bucket);
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) above += cand_val[j] > kth;
  int64_t equal_left = kth > -INFINITY ? k - above : 0;
  int64_t written = 0;
  for (int64_t j = 0; j < n && written < count; ++j) {
    const float value = cand_val[j];
    if (value > kth || (value == kth && equal_left > 0)) {
      if (value == kth) --equal_left;
      out[written++] = cand_idx[j];
    }
  }
  for (; written < count; ++written) out[written] = -1;
}

// Writes row's `count` selected keys to out in ascending order, -1 after the last, following the
// reference's rule: every score above the count-th largest, then the lowest-index keys equal to it.
// Invisible keys are -inf and never selected. scratch has room for at least span entries.
template <typename I>
void select_row(const float* row, int64_t span, int64_t count, I* out, RowScratch& scratch) {
  int32_t* cand_idx = scratch.idx.data();
  float* cand_val = scratch.val.data();
  int64_t n = 0;
  if (span >= SAMPLED_MIN_SPAN * count) {
    // The bound is the rank-th largest of the sample, with rank sized for about 1.25 * count keys at or
    // above it. The count largest scores are then all at or above the bound whenever at least count
    // keys reach it. That is checked, and where it fails every key is a candidate.
    float* sample = scratch.sample.data();
    int64_t samples = 0;
    for (int64_t i = 0; i < span; i += SAMPLE_STRIDE) sample[samples++] = row[i];
    const int64_t rank = std::min<int64_t>(samples, count * 5 / 4 / SAMPLE_STRIDE + 16);
    const float bound = kth_largest(sample, samples, rank, scratch.bucket.data());
    if (bound > -INFINITY) {
      // Without a branch: every key is written, and the count moves on only for those at or above the bound.
      for (int64_t i = 0; i < span; ++i) {
        const float value = row[i];
        cand_idx[n] = static_cast<int32_t>(i);
        cand_val[n] = value;
        n += value >= bound;
      }
      if (n < count || n > span / 2) n = 0;
    }
  }
  if (n == 0) {
    for (int64_t i = 0; i < span; ++i) cand_idx[i] = static_cast<int32_t>(i);
    std::memcpy(cand_val, row, span * sizeof(float));
    n = span;
  }
  select_candidates(cand_idx, cand_val, n, count, scratch.bucket.data(), out);
}

}  // namespace

namespace {

// Rows of an index tensor (int64 or int32, I) that a selection kernel writes: [R, count] or [B, Tc, count]
// with B * Tc = R, unit stride along count and any row strides, such as a slice of a larger buffer.
template <typename I>
struct RowOut {
  I* ptr;
  int64_t inner, outer_stride, inner_stride;
  I* row(int64_t r) const { return ptr + (r / inner) * outer_stride + (r % inner) * inner_stride; }
};

void check_row_out(const torch::Tensor& out, int64_t rows, int64_t count, const char* name) {
  TORCH_CHECK((out.dtype() == torch::kInt64 || out.dtype() == torch::kInt32) && out.device().is_cpu(), name,
              " expects an int64 or int32 CPU out tensor");
  TORCH_CHECK((out.dim() == 2 || out.dim() == 3) && out.size(-1) == count && out.stride(-1) == 1, name,
              " expects out [R, count] or [B, Tc, count] with unit stride along count");
  const int64_t got = out.dim() == 2 ? out.size(0) : out.size(0) * out.size(1);
  TORCH_CHECK(got == rows, name, " expects ", rows, " rows in out, got ", got);
}

template <typename I>
RowOut<I> row_out(torch::Tensor& out, int64_t rows) {
  if (out.dim() == 2) return {out.data_ptr<I>(), std::max<int64_t>(rows, 1), 0, out.stride(0)};
  return {out.data_ptr<I>(), std::max<int64_t>(out.size(1), 1), out.stride(0), out.stride(1)};
}

template <typename I>
void select_rows_impl(const float* score_ptr, int64_t rows, int64_t span, int64_t count, const RowOut<I>& dest) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(span);
    for (int64_t r = begin; r < end; ++r) select_row(score_ptr + r * span, span, count, dest.row(r), scratch);
  });
}

}  // namespace

// Selects from scores [R, S'] (fp32, unit stride along S', invisible keys -inf) each row's indices,
// ascending, -1 after the row's last visible key. Writes them into out (see RowOut) and returns out.
// count <= S'.
torch::Tensor select_rows(torch::Tensor scores, int64_t count, torch::Tensor out) {
  TORCH_CHECK(scores.dtype() == torch::kFloat32 && scores.dim() == 2, "select_rows expects fp32 scores [R, S']");
  TORCH_CHECK(count >= 1 && count <= scores.size(1), "select_rows expects 1 <= count <= S'");
  scores = scores.contiguous();
  const int64_t rows = scores.size(0), span = scores.size(1);
  TORCH_CHECK(span <= INT32_MAX, "select_rows expects fewer than 2^31 keys");
  check_row_out(out, rows, count, "select_rows");
  const float* score_ptr = scores.data_ptr<float>();
  if (out.dtype() == torch::kInt32) select_rows_impl(score_ptr, rows, span, count, row_out<int32_t>(out, rows));
  else select_rows_impl(score_ptr, rows, span, count, row_out<int64_t>(out, rows));
  return out;
}

// select_chunk: the selection of one chunk of queries without its scores [B, Tc, S']. Each row's bound
// comes from the scores of every SAMPLE_STRIDE-th key, as in select_row. The full pass then scores one
// block of keys at a time and keeps, per row, only the visible keys at or above the row's bound. A
// chunk thus keeps its sample and its candidates instead of Tc * S' scores (16 MiB for 64 queries at
// 64k keys). Row t of the chunk may attend keys [0, first + t]. q, k_t and w are as for index_scores.
// Writes indices [B, Tc, count] into out (see RowOut) in the reference's order and tie rule, and returns
// true. Returns false without writing when a row may attend fewer than SAMPLED_MIN_SPAN * count keys,
// so that the caller scores the chunk in full.
bool select_chunk(torch::Tensor q_in, torch::Tensor k_t, torch::Tensor w_in, int64_t first, int64_t count,
                  torch::Tensor out) {
  auto [q, w] = check_score_inputs("select_chunk", q_in, k_t, w_in);
  TORCH_CHECK(first >= 0 && count >= 1, "select_chunk expects first >= 0 and count >= 1");
  const bool round = k_t.dtype() == torch::kBFloat16;
  const int64_t batch = q.size(0), queries = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t span = k_t.size(2);
  TORCH_CHECK(span <= INT32_MAX, "select_chunk expects fewer than 2^31 keys");
  check_row_out(out, batch * queries, count, "select_chunk");
  if (std::min(span, first + 1) < SAMPLED_MIN_SPAN * count) return false;
  const KeySource src = key_source(k_t);
  const float* w_ptr = w.data_ptr<float>();
  const std::vector<float> q_packed = pack_all_queries(q.data_ptr<float>(), batch, queries, heads, head_dim);
  const int64_t rows = batch * queries;
  auto visible = [&](int64_t row) { return std::min(span, first + row % queries + 1); };
  auto q_of = [&](int64_t b) { return q_packed.data() + b * queries * heads * head_dim; };
  auto w_of = [&](int64_t b) { return w_ptr + b * queries * heads; };

  // Scores of the sampled keys 0, SAMPLE_STRIDE, 2 * SAMPLE_STRIDE, ...: [rows, samples].
  const int64_t samples = (span + SAMPLE_STRIDE - 1) / SAMPLE_STRIDE;
  const int64_t sample_blocks = (samples + KEY_BLOCK - 1) / KEY_BLOCK;
  std::vector<float> sampled(static_cast<size_t>(rows * samples));
  at::parallel_for(0, batch * sample_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> packed(static_cast<size_t>(head_dim * KEY_BLOCK));
    std::vector<float> tile(static_cast<size_t>(queries * KEY_BLOCK));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / sample_blocks, lo = (item % sample_blocks) * KEY_BLOCK;
      const int64_t n = std::min(KEY_BLOCK, samples - lo);
      pack_keys(src, b, lo * SAMPLE_STRIDE, SAMPLE_STRIDE, n, packed.data());
      score_block(q_of(b), w_of(b), queries, heads, head_dim, round, packed.data(), (n + GROUP - 1) / GROUP,
                  tile.data(), KEY_BLOCK);
      for (int64_t t = 0; t < queries; ++t)
        std::memcpy(sampled.data() + (b * queries + t) * samples + lo, tile.data() + t * KEY_BLOCK, n * sizeof(float));
    }
  });
  // Each row's bound: the rank-th largest of its visible samples (select_row's rule).
  std::vector<float> bound(static_cast<size_t>(rows));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bucket(static_cast<size_t>(samples));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t seen = (visible(r) + SAMPLE_STRIDE - 1) / SAMPLE_STRIDE;
      const int64_t rank = std::min<int64_t>(seen, count * 5 / 4 / SAMPLE_STRIDE + 16);
      bound[r] = kth_largest(sampled.data() + r * samples, seen, rank, bucket.data());
    }
  });
  std::vector<float>().swap(sampled);

  // Full pass: the keys split into `parts` ranges of blocks, in key order, each appending its candidates
  // to its own list per row, so that the lists of one row, read part after part, are in key order. The
  // lists hold int32 keys and start with room for a part's share of about 1.5 * count candidates, so
  // that few of them grow (a grown vector's capacity doubles).
  const int64_t blocks = (span + KEY_BLOCK - 1) / KEY_BLOCK;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t blocks_per_part = (blocks + parts - 1) / parts;
  const size_t room = static_cast<size_t>(count * 3 / 2 / parts + KEY_BLOCK);
  std::vector<std::vector<int32_t>> cand_idx(static_cast<size_t>(batch * parts * queries));
  std::vector<std::vector<float>> cand_val(cand_idx.size());
  at::parallel_for(0, batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> packed(static_cast<size_t>(head_dim * KEY_BLOCK));
    std::vector<float> tile(static_cast<size_t>(queries * KEY_BLOCK));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / parts, part = item % parts;
      for (int64_t block = part * blocks_per_part; block < std::min(blocks, (part + 1) * blocks_per_part); ++block) {
        const int64_t lo = block * KEY_BLOCK, n = std::min(KEY_BLOCK, span - lo);
        pack_keys(src, b, lo, 1, n, packed.data());
        score_block(q_of(b), w_of(b), queries, heads, head_dim, round, packed.data(), (n + GROUP - 1) / GROUP,
                    tile.data(), KEY_BLOCK);
        for (int64_t t = 0; t < queries; ++t) {
          const int64_t r = b * queries + t, limit = std::min(n, visible(r) - lo);
          if (limit <= 0) continue;
          std::vector<int32_t>& idx = cand_idx[item * queries + t];
          std::vector<float>& val = cand_val[item * queries + t];
          if (idx.capacity() == 0) {
            idx.reserve(room);
            val.reserve(room);
          }
          int64_t m = static_cast<int64_t>(idx.size());
          idx.resize(m + limit);
          val.resize(m + limit);
          const float* row = tile.data() + t * KEY_BLOCK;
          const float floor = bound[r];
          // Without a branch, as in select_row: every key is written, the count moves on for candidates.
          for (int64_t i = 0; i < limit; ++i) {
            idx[m] = static_cast<int32_t>(lo + i);
            val[m] = row[i];
            m += row[i] >= floor;
          }
          idx.resize(m);
          val.resize(m);
        }
      }
    }
  });

  // The selection of each row, written as the out tensor's index type.
  auto select_all = [&](const auto& dest) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      // Scratch sized by the candidates; span-sized scratch only for a row scored in full.
      std::vector<int32_t> idx;
      std::vector<float> val, bucket, packed, full_row;
      std::unique_ptr<RowScratch> scratch;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / queries, t = r % queries, seen = visible(r);
        int64_t n = 0;
        for (int64_t part = 0; part < parts; ++part) n += static_cast<int64_t>(cand_idx[(b * parts + part) * queries + t].size());
        if (static_cast<int64_t>(idx.size()) < n) {
          idx.resize(n);
          val.resize(n);
          bucket.resize(n);
        }
        n = 0;
        for (int64_t part = 0; part < parts; ++part) {
          const size_t list = static_cast<size_t>((b * parts + part) * queries + t);
          std::copy(cand_idx[list].begin(), cand_idx[list].end(), idx.begin() + n);
          std::copy(cand_val[list].begin(), cand_val[list].end(), val.begin() + n);
          n += static_cast<int64_t>(cand_idx[list].size());
        }
        auto* row_dest = dest.row(r);
        if (n < count) {
          if (!scratch) scratch = std::make_unique<RowScratch>(span);
          // The bound admitted too few keys: score this row in full and select as select_rows does.
          packed.resize(static_cast<size_t>(head_dim * KEY_BLOCK));
          full_row.resize(static_cast<size_t>(blocks * KEY_BLOCK));
          std::vector<float> q_row(static_cast<size_t>(heads * head_dim));
          pack_queries(q.data_ptr<float>() + r * heads * head_dim, 1, heads, head_dim, q_row.data());
          for (int64_t block = 0; block < blocks; ++block) {
            const int64_t lo = block * KEY_BLOCK, n_keys = std::min(KEY_BLOCK, span - lo);
            pack_keys(src, b, lo, 1, n_keys, packed.data());
            score_block(q_row.data(), w_ptr + r * heads, 1, heads, head_dim, round, packed.data(),
                        (n_keys + GROUP - 1) / GROUP, full_row.data() + lo, KEY_BLOCK);
          }
          select_row(full_row.data(), seen, count, row_dest, *scratch);
          continue;
        }
        select_candidates(idx.data(), val.data(), n, count, bucket.data(), row_dest);
      }
    });
  };
  if (out.dtype() == torch::kInt32) select_all(row_out<int32_t>(out, rows));
  else select_all(row_out<int64_t>(out, rows));
  return true;
}

namespace {

using hvec = uint16_t __attribute__((vector_size(32)));  // 16 bf16 values

// Loads 16 bf16 values as fp32 (a bf16 value is the upper half of its fp32 bits).
inline vec load_bf16(const at::BFloat16* p) {
  hvec h;
  std::memcpy(&h, p, sizeof(hvec));
  const uvec bits = __builtin_convertvector(h, uvec) << 16;
  vec x;
  std::memcpy(&x, &bits, sizeof(vec));
  return x;
}

// Key rows per work item of the keys-major scores.
constexpr int64_t ROW_BLOCK = 1024;

// Scores of the queries whose (query, head) rows are qh (pairs x DV vectors in pair order, q rounded by the
// caller where ROUND) against keys [first, last) of k (rows of stride k_stride, DV vectors each):
// out[j * out_stride + s] = sum_h w[j * heads + h] * relu(q[j, h] . k_s). wq contains each group of four
// weights of one query at lanes 0, 4, 8 and 12 (zeros elsewhere), where hsum4 leaves its sums. So the
// ReLU, the weighting and the sum over heads stay in vector registers. heads % 4 == 0.
template <int DV, bool ROUND, typename T>
void score_keys_major(const vec* qh, const vec* wq, int64_t queries, int64_t heads, const T* k, int64_t k_stride,
                      int64_t first, int64_t last, float* out, int64_t out_stride) {
  const int64_t groups = heads / 4;
  const vec zero{};
  for (int64_t s = first; s < last; ++s) {
    if (s + 16 < last) __builtin_prefetch(k + (s + 16) * k_stride);
    vec key[DV];
    const T* row = k + s * k_stride;
    for (int c = 0; c < DV; ++c) {
      if constexpr (std::is_same_v<T, float>)
        key[c] = load(row + c * LANES);
      else
        key[c] = load_bf16(row + c * LANES);
    }
    for (int64_t j = 0; j < queries; ++j) {
      vec total{};
      for (int64_t g = 0; g < groups; ++g) {
        const vec* q4 = qh + (j * heads + g * 4) * DV;
        vec acc[4];
        for (int i = 0; i < 4; ++i) {
          acc[i] = q4[i * DV] * key[0];
          for (int c = 1; c < DV; ++c) acc[i] += q4[i * DV + c] * key[c];
        }
        vec logits = hsum4(acc[0], acc[1], acc[2], acc[3]);
        if (ROUND) logits = round_bf16(logits);
        total += wq[j * groups + g] * (logits > zero ? logits : zero);
      }
      total += __builtin_shufflevector(total, total, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
      total += __builtin_shufflevector(total, total, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
      out[j * out_stride + s] = total[0];
    }
  }
}

template <int DV>
void score_keys_major_dispatch(const vec* qh, const vec* wq, int64_t queries, int64_t heads, const torch::Tensor& k,
                               int64_t b, int64_t first, int64_t last, float* out, int64_t out_stride) {
  if (k.scalar_type() == torch::kBFloat16)
    score_keys_major<DV, true>(qh, wq, queries, heads, k.data_ptr<at::BFloat16>() + b * k.stride(0), k.stride(1),
                               first, last, out, out_stride);
  else
    score_keys_major<DV, false>(qh, wq, queries, heads, k.data_ptr<float>() + b * k.stride(0), k.stride(1), first,
                                last, out, out_stride);
}

}  // namespace

// Top-k selection for a few queries (decode) from keys in the cache's own layout. q is [B, Tc, HI, DI] fp32,
// holding bf16 values when k is bf16. k is [B, S, DI] fp32 or bf16 with unit stride along DI. DI is 16, 32,
// 64 or 128 and HI a multiple of 4. w is [B, Tc, HI] fp32, already scaled. Query t may attend keys
// 0 .. first + t (the causal rule and no other mask).
// Returns indices [B, Tc, count] int64, ascending, -1 after a row's last visible key, with the tie rule of
// select_rows. The scores are computed keys-major, one key row against every (query, head) pair, so the
// cache is read once, in order, without the transposed copy the many-query kernel needs.
torch::Tensor select_few(torch::Tensor q, torch::Tensor k, torch::Tensor w, int64_t first, int64_t count) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "select_few expects fp32 q and w");
  TORCH_CHECK(k.dtype() == torch::kFloat32 || k.dtype() == torch::kBFloat16, "select_few expects fp32 or bf16 k");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && w.dim() == 3 && k.stride(2) == 1,
              "select_few expects q [B, Tc, HI, DI], k [B, S, DI] with unit stride along DI and w [B, Tc, HI]");
  q = q.contiguous();
  w = w.contiguous();
  const int64_t batch = q.size(0), queries = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t span = std::min<int64_t>(k.size(1), first + queries);
  TORCH_CHECK(span <= INT32_MAX, "select_few expects fewer than 2^31 keys");
  TORCH_CHECK(k.size(0) == batch && k.size(2) == head_dim && w.size(0) == batch && w.size(1) == queries &&
                  w.size(2) == heads && first >= 0 && count >= 1,
              "select_few got mismatched shapes or arguments");
  TORCH_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128,
              "select_few supports DI 16, 32, 64 and 128; got ", head_dim);
  TORCH_CHECK(heads % 4 == 0, "select_few supports HI a multiple of 4; got ", heads);

  const int64_t pairs = queries * heads;
  // (query, head) rows as vectors, in pair order.
  std::vector<vec> qh(static_cast<size_t>(batch * pairs * (head_dim / LANES)));
  std::memcpy(qh.data(), q.data_ptr<float>(), qh.size() * sizeof(vec));
  // Each group of four weights at lanes 0, 4, 8 and 12 (see score_keys_major).
  std::vector<vec> wq(static_cast<size_t>(batch * pairs / 4), vec{});
  for (int64_t p = 0; p < batch * pairs; ++p) wq[p / 4][(p % 4) * 4] = w.data_ptr<float>()[p];

  auto scores = torch::empty({batch, queries, span}, q.options());
  float* score_ptr = scores.data_ptr<float>();
  const int64_t blocks = (span + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t dv = head_dim / LANES;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, lo = (item % blocks) * ROW_BLOCK, hi = std::min(span, lo + ROW_BLOCK);
      const vec* q_b = qh.data() + b * pairs * dv;
      const vec* w_b = wq.data() + b * pairs / 4;
      float* out_b = score_ptr + b * queries * span;
      if (dv == 1) score_keys_major_dispatch<1>(q_b, w_b, queries, heads, k, b, lo, hi, out_b, span);
      else if (dv == 2) score_keys_major_dispatch<2>(q_b, w_b, queries, heads, k, b, lo, hi, out_b, span);
      else if (dv == 4) score_keys_major_dispatch<4>(q_b, w_b, queries, heads, k, b, lo, hi, out_b, span);
      else score_keys_major_dispatch<8>(q_b, w_b, queries, heads, k, b, lo, hi, out_b, span);
    }
  });

  auto out = torch::empty({batch, queries, count}, q.options().dtype(torch::kInt64));
  int64_t* out_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, batch * queries, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(span);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % queries;
      const int64_t visible = std::min(span, first + t + 1);
      select_row(score_ptr + r * span, visible, std::min(count, visible), out_ptr + r * count, scratch);
      for (int64_t i = std::min(count, visible); i < count; ++i) out_ptr[r * count + i] = -1;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("index_scores", &index_scores, "Fused lightning indexer scores (fp32, CPU)");
  m.def("select_rows", &select_rows, "Top-k keys of each score row, ascending, with the tie rule, into out (CPU)");
  m.def("select_chunk", &select_chunk, "Top-k keys of a chunk of queries without its full scores, into out (CPU)");
  m.def("select_few", &select_few, "Top-k keys for a few queries from keys-major indexer keys (CPU)");
  m.def("sparse_attention", &sparse_attention, "Sparse attention forward over index rows (fp32, CPU)");
}
