// GGUF block GEMV on the CPU: y[M, N] = x[M, K] @ W.T for W in llama.cpp's Q4_0, Q4_1 or Q8_0
// blocks, read as stored (the field planes of pallas_kernels.gguf_matmul.split_blocks), as
// XLA FFI handlers (xla/ffi/api/ffi.h). Built and registered by pallas_kernels/gguf_cpu.py.
//
// Per block of 32 values the codes are widened to float32 and multiplied by x in float32 with
// FMAs; the block's scale multiplies that partial dot once (Q4_1: plus m * sum(x of the block)).
// Nothing is written but y: the weight is never decoded to memory (the reason XLA:CPU's decode
// step is slow: it materialises every decoded weight piece before its dot). Rows are split in
// chunks over XLA's intra-op thread pool. Block layouts: ggml ggml-common.h (block_q4_0,
// block_q4_1, block_q8_0); the values equal gguf.quants.dequantize's (w = d * (q - 8),
// d * q + m, d * q), the products differ from a float64 product by float32 rounding only.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define JQ_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;

inline float f16_to_f32(uint16_t h) {
#ifdef JQ_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

enum class Fmt { kQ4_0, kQ4_1, kQ8_0 };

// One weight's planes, layer already applied: d/m [N, nb] float16 bits, qs [N, nb, qstride].
struct Weight {
  const uint16_t* d;
  const uint16_t* m;  // Q4_1 only
  const uint8_t* qs;
  int64_t n, nb, qstride;
};

#ifdef JQ_AVX2
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// The 32 codes of one block as 4 x 8 float32 (Q4_0: q - 8; Q4_1: q; Q8_0: signed q).
template <Fmt F>
inline void decode(const uint8_t* q, __m256 v[4]) {
  if constexpr (F == Fmt::kQ8_0) {
    __m128i a = _mm_loadu_si128((const __m128i*)q), b = _mm_loadu_si128((const __m128i*)(q + 16));
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  } else {
    const __m128i raw = _mm_loadu_si128((const __m128i*)q), mask = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    if constexpr (F == Fmt::kQ4_0) {
      lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
      hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
    }
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  }
}

// Rows [r0, r1) of W against T rows of x (x row stride k), y row stride n.
template <Fmt F, int T>
void rows_tile(const Weight& w, const float* x, int64_t k, const float* xsum, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* dr = w.d + r * w.nb;
    const uint8_t* qr = w.qs + r * w.nb * w.qstride;
    __m256 acc[T];
    float macc[T];
    for (int t = 0; t < T; ++t) { acc[t] = _mm256_setzero_ps(); macc[t] = 0.f; }
    for (int64_t b = 0; b < w.nb; ++b) {
      __m256 v[4];
      decode<F>(qr + b * w.qstride, v);
      const __m256 d = _mm256_set1_ps(f16_to_f32(dr[b]));
      for (int t = 0; t < T; ++t) {
        const float* xb = x + t * k + b * kBlock;
        __m256 s = _mm256_mul_ps(v[0], _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xb + 8), s);
        s = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xb + 16), s);
        s = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xb + 24), s);
        acc[t] = _mm256_fmadd_ps(d, s, acc[t]);
      }
      if constexpr (F == Fmt::kQ4_1) {
        const float m = f16_to_f32(w.m[r * w.nb + b]);
        for (int t = 0; t < T; ++t) macc[t] += m * xsum[t * w.nb + b];
      }
    }
    for (int t = 0; t < T; ++t) y[t * w.n + r] = hsum(acc[t]) + macc[t];
  }
}
#else
template <Fmt F>
inline void decode_scalar(const uint8_t* q, float v[kBlock]) {
  for (int i = 0; i < 16; ++i) {
    if constexpr (F == Fmt::kQ8_0) {
      v[i] = (float)(int8_t)q[i];
      v[i + 16] = (float)(int8_t)q[i + 16];
    } else {
      const int off = F == Fmt::kQ4_0 ? 8 : 0;
      v[i] = (float)((q[i] & 15) - off);
      v[i + 16] = (float)((q[i] >> 4) - off);
    }
  }
}

template <Fmt F, int T>
void rows_tile(const Weight& w, const float* x, int64_t k, const float* xsum, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[T] = {}, macc[T] = {};
    for (int64_t b = 0; b < w.nb; ++b) {
      float v[kBlock];
      decode_scalar<F>(w.qs + (r * w.nb + b) * w.qstride, v);
      const float d = f16_to_f32(w.d[r * w.nb + b]);
      for (int t = 0; t < T; ++t) {
        const float* xb = x + t * k + b * kBlock;
        float s = 0.f;
        for (int i = 0; i < kBlock; ++i) s += v[i] * xb[i];
        acc[t] += d * s;
      }
      if constexpr (F == Fmt::kQ4_1) {
        const float m = f16_to_f32(w.m[r * w.nb + b]);
        for (int t = 0; t < T; ++t) macc[t] += m * xsum[t * w.nb + b];
      }
    }
    for (int t = 0; t < T; ++t) y[t * w.n + r] = acc[t] + macc[t];
  }
}
#endif

// Every row of x against rows [r0, r1) of W, in tiles of up to 4 rows of x.
template <Fmt F>
void rows(const Weight& w, const float* x, int64_t mrows, int64_t k, const float* xsum, float* y, int64_t r0,
          int64_t r1) {
  int64_t t = 0;
  for (; t + 4 <= mrows; t += 4) rows_tile<F, 4>(w, x + t * k, k, xsum + t * w.nb, y + t * w.n, r0, r1);
  switch (mrows - t) {
    case 3: rows_tile<F, 3>(w, x + t * k, k, xsum + t * w.nb, y + t * w.n, r0, r1); break;
    case 2: rows_tile<F, 2>(w, x + t * k, k, xsum + t * w.nb, y + t * w.n, r0, r1); break;
    case 1: rows_tile<F, 1>(w, x + t * k, k, xsum + t * w.nb, y + t * w.n, r0, r1); break;
    default: break;
  }
}

// Chunks claimed from a shared counter by the caller and by helpers scheduled on XLA's pool.
// The caller waits only for chunks another thread has claimed and is running; a helper that
// starts late finds nothing left and returns (it holds the job, so nothing it reads is gone).
struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> work;
  void drain() {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      work(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> work) {
  const int64_t threads = pool.num_threads();
  if (chunks <= 1 || threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) work(c);
    return;
  }
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->work = std::move(work);
  const int64_t helpers = std::min(threads, chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->drain(); });
  job->drain();
  while (job->done.load(std::memory_order_acquire) < chunks) {
#ifdef JQ_AVX2
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  job->work = nullptr;  // the caller's captures end here; a late helper only reads the counters
}

template <Fmt F>
ffi::Error gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                ffi::Buffer<ffi::F16> d, const uint16_t* m_plane, ffi::Buffer<ffi::U8> qs,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = qs.dimensions(), xd = x.dimensions();
  if (xd.size() != 2 || (qd.size() != 3 && qd.size() != 4))
    return ffi::Error::InvalidArgument("gguf_cpu: x must be [M, K] and qs [(L,) N, nb, bytes]");
  const bool stacked = qd.size() == 4;
  const int64_t layers = stacked ? qd[0] : 1, n = qd[qd.size() - 3], nb = qd[qd.size() - 2],
                qstride = qd[qd.size() - 1], mrows = xd[0], k = xd[1];
  const int64_t need = F == Fmt::kQ8_0 ? 32 : 16;
  if (k != nb * kBlock || qstride < need)
    return ffi::Error::InvalidArgument("gguf_cpu: x's K is not nb * 32, or the qs plane is too narrow");
  const int64_t l = stacked ? (int64_t)layer.typed_data()[0] : 0;
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("gguf_cpu: layer index out of range");
  Weight w{reinterpret_cast<const uint16_t*>(d.typed_data()) + l * n * nb,
           m_plane ? m_plane + l * n * nb : nullptr, qs.typed_data() + l * n * nb * qstride, n, nb, qstride};
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  std::vector<float> xsum;
  if (F == Fmt::kQ4_1) {
    xsum.resize(mrows * nb);
    for (int64_t i = 0; i < mrows * nb; ++i) {
      float s = 0.f;
      for (int j = 0; j < kBlock; ++j) s += xp[i * kBlock + j];
      xsum[i] = s;
    }
  }
  // Chunks of rows: about 64 K weights each, at least 8 rows.
  const int64_t per = std::max<int64_t>(8, (int64_t)65536 / std::max<int64_t>(k, 1));
  const int64_t chunks = (n + per - 1) / per;
  const float* xs = xsum.data();
  parallel_chunks(pool, chunks, [&](int64_t c) {
    rows<F>(w, xp, mrows, k, xs, yp, c * per, std::min(n, (c + 1) * per));
  });
  return ffi::Error::Success();
}

ffi::Error gemv_q4_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::U8> qs, ffi::ResultBuffer<ffi::F32> y) {
  return gemv<Fmt::kQ4_0>(pool, x, layer, d, nullptr, qs, y);
}

ffi::Error gemv_q4_1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::Buffer<ffi::U8> qs,
                     ffi::ResultBuffer<ffi::F32> y) {
  if (m.element_count() != d.element_count())
    return ffi::Error::InvalidArgument("gguf_cpu: Q4_1 m plane does not match d");
  return gemv<Fmt::kQ4_1>(pool, x, layer, d, reinterpret_cast<const uint16_t*>(m.typed_data()), qs, y);
}

ffi::Error gemv_q8_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::U8> qs, ffi::ResultBuffer<ffi::F32> y) {
  return gemv<Fmt::kQ8_0>(pool, x, layer, d, nullptr, qs, y);
}

}  // namespace

// The binding of the formats with planes d and qs (Q4_0, Q8_0): x, layer, d, qs -> y.
#define JQ_BIND_D_QS                                                                                   \
  ffi::Ffi::Bind()                                                                                     \
      .Ctx<ffi::ThreadPool>()                                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                    \
      .Arg<ffi::Buffer<ffi::S32>>()                                                                    \
      .Arg<ffi::Buffer<ffi::F16>>()                                                                    \
      .Arg<ffi::Buffer<ffi::U8>>()                                                                     \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqloraGgufGemvQ4_0, gemv_q4_0, JQ_BIND_D_QS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqloraGgufGemvQ4_1, gemv_q4_1,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqloraGgufGemvQ8_0, gemv_q8_0, JQ_BIND_D_QS);
