// kvpipe CacheGen native coder (container coder id 2): static-model rANS, 4 interleaved states, 12-bit
// probabilities, 32-bit states, 16-bit renormalisation. Built on first use by kvpipe.serde.cachegen.native
// (g++ -O3 -shared [-fopenmp]) and called through ctypes, which releases the GIL; segments (one per layer and
// K/V) are coded in parallel with OpenMP when available.
//
// Stream layout, per table, inside its segment's u32 words:  u32 n16 | ceil(n16 / 2) u32 words holding n16
// little-endian 16-bit rANS words (decoder reads them front to back; the first 8 words are the 4 final states).
#include <cmath>
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVPIPE_X86 1
#endif
#include <cstring>
#include <vector>

namespace {

constexpr uint32_t kProbBits = 12;
constexpr uint32_t kProbScale = 1u << kProbBits;
constexpr uint32_t kRansL = 1u << 16;

// Integer-only normalisation of u16 frequencies to kProbScale; identical on both sides.
// Returns false for a table with no nonzero frequency.
bool normalize(const uint16_t* f, int64_t alph, uint32_t* freq, uint32_t* cum) {
  uint64_t total = 0;
  for (int64_t a = 0; a < alph; ++a) total += f[a];
  if (total == 0) return false;
  int64_t sum = 0, best = 0;
  for (int64_t a = 0; a < alph; ++a) {
    uint32_t s = 0;
    if (f[a]) {
      s = static_cast<uint32_t>((static_cast<uint64_t>(f[a]) * kProbScale) / total);
      if (s == 0) s = 1;
    }
    freq[a] = s;
    sum += s;
    if (f[a] > f[best]) best = a;
  }
  int64_t d = sum - static_cast<int64_t>(kProbScale);
  if (d < 0 || static_cast<int64_t>(freq[best]) - d >= 1) {
    freq[best] = static_cast<uint32_t>(static_cast<int64_t>(freq[best]) - d);
  } else {
    while (d > 0) {  // rare: shave the largest frequencies one at a time
      int64_t m = 0;
      for (int64_t a = 1; a < alph; ++a) if (freq[a] > freq[m]) m = a;
      if (freq[m] <= 1) return false;
      --freq[m];
      --d;
    }
  }
  uint32_t c = 0;
  for (int64_t a = 0; a < alph; ++a) { cum[a] = c; c += freq[a]; }
  return c == kProbScale;
}

// Encodes n symbols; writes 16-bit words backwards ending at buf + cap; returns the word count or -1.
int64_t encode_table(const int32_t* sym, int64_t n, const uint32_t* freq, const uint32_t* cum, int64_t alph,
                     uint16_t* buf, int64_t cap) {
  uint32_t x[4] = {kRansL, kRansL, kRansL, kRansL};
  uint16_t* p = buf + cap;
  for (int64_t i = n - 1; i >= 0; --i) {
    int32_t s = sym[i];
    if (s < 0 || s >= alph || freq[s] == 0) return -1;
    uint32_t& st = x[i & 3];
    uint32_t f = freq[s];
    uint32_t x_max = ((kRansL >> kProbBits) << 16) * f;
    if (st >= x_max) {
      if (p == buf) return -1;
      *--p = static_cast<uint16_t>(st & 0xffff);
      st >>= 16;
    }
    st = ((st / f) << kProbBits) + (st % f) + cum[s];
  }
  for (int j = 3; j >= 0; --j) {
    if (p - buf < 2) return -1;
    *--p = static_cast<uint16_t>(x[j] >> 16);
    *--p = static_cast<uint16_t>(x[j] & 0xffff);
  }
  return (buf + cap) - p;
}

// Packed decode table, one u32 per 12-bit slot: bits 0-11 freq - 1, bits 12-23 slot - cum (the state bias),
// bits 24-31 the symbol; one load per decoded symbol.
void build_slots(const uint32_t* freq, const uint32_t* cum, int64_t alph, uint32_t* slots) {
  for (int64_t v = 0; v < alph; ++v) {
    const uint32_t base = (freq[v] - 1u) | (static_cast<uint32_t>(v) << 24);
    for (uint32_t k = 0; k < freq[v]; ++k) slots[cum[v] + k] = base | (k << 12);
  }
}

// Decodes n symbols from n16 16-bit words; returns 0, or -1 when the stream runs out. Renormalisation is
// branchless (its outcome is data-dependent and mispredicts often): a state below kRansL takes the next word,
// read from a zero word once the stream is exhausted, which is then reported as an error.
int decode_table(const uint16_t* in, int64_t n16, int64_t n, const uint32_t* slots, uint8_t* out) {
  if (n16 < 8) return -1;
  uint32_t x[4];
  for (int j = 0; j < 4; ++j) x[j] = static_cast<uint32_t>(in[2 * j]) | (static_cast<uint32_t>(in[2 * j + 1]) << 16);
  const uint16_t* p = in + 8;
  const uint16_t* end = in + n16;
  static const uint16_t zero = 0;
  uint32_t overrun = 0;
  auto step = [&](uint32_t& st, uint8_t* o) {
    const uint32_t e = slots[st & (kProbScale - 1)];
    *o = static_cast<uint8_t>(e >> 24);
    st = ((e & 0xfffu) + 1u) * (st >> kProbBits) + ((e >> 12) & 0xfffu);
    const uint32_t need = st < kRansL;
    const uint32_t avail = p < end;
    overrun |= need & (avail ^ 1u);
    const uint16_t* src = avail ? p : &zero;
    const uint32_t w = *src;
    st = need ? ((st << 16) | w) : st;
    p += need & avail;
  };
  int64_t i = 0;
  // Main loop: four symbols per iteration, one per state (independent dependency chains).
  for (; i + 4 <= n; i += 4) {
    step(x[0], out + i);
    step(x[1], out + i + 1);
    step(x[2], out + i + 2);
    step(x[3], out + i + 3);
  }
  for (; i < n; ++i) step(x[i & 3], out + i);
  return overrun ? -1 : 0;
}

// Decodes a short table (n symbols, n small next to the 4096-slot table) without building the slot table: the
// slot's symbol is found by binary search over cum. Same arithmetic as decode_table, so the same output.
int decode_table_small(const uint16_t* in, int64_t n16, int64_t n, const uint32_t* freq, const uint32_t* cum,
                       int64_t alph, uint8_t* out) {
  if (n16 < 8) return -1;
  uint32_t x[4];
  for (int j = 0; j < 4; ++j) x[j] = static_cast<uint32_t>(in[2 * j]) | (static_cast<uint32_t>(in[2 * j + 1]) << 16);
  const uint16_t* p = in + 8;
  const uint16_t* end = in + n16;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t& st = x[i & 3];
    const uint32_t slot = st & (kProbScale - 1);
    int64_t lo = 0, hi = alph - 1;  // the last symbol with cum <= slot (zero-frequency symbols never match)
    while (lo < hi) {
      const int64_t m = (lo + hi + 1) >> 1;
      if (cum[m] <= slot) lo = m; else hi = m - 1;
    }
    while (freq[lo] == 0 && lo > 0) --lo;  // unreachable for a valid table; keeps a corrupt one in bounds
    if (freq[lo] == 0 || slot - cum[lo] >= freq[lo]) return -1;
    out[i] = static_cast<uint8_t>(lo);
    st = freq[lo] * (st >> kProbBits) + (slot - cum[lo]);
    if (st < kRansL) {
      if (p >= end) return -1;
      st = (st << 16) | *p++;
    }
  }
  return 0;
}

// Tables with fewer symbols than this skip the slot table (building it writes 4096 words).
constexpr int64_t kSmallTable = 512;

}  // namespace

extern "C" {

// Encodes every table. Table t's record goes to out + rec_off[t] (capacity rec_cap[t] u32 words, computed by the
// caller); rec_len[t] receives the record's length in u32 words. Returns 0, or -(t + 1) for a failing table.
int64_t kvpipe_rans_encode(const int32_t* sym, int64_t ntables, const int64_t* alph, const int64_t* sym_off,
                           const int64_t* counts, const uint16_t* freqs, const int64_t* freq_off, uint32_t* out,
                           const int64_t* rec_off, const int64_t* rec_cap, int64_t* rec_len, int nthreads) {
  int64_t err = 0;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) reduction(min : err)
  for (int64_t t = 0; t < ntables; ++t) {
    int64_t a = alph[t];
    std::vector<uint32_t> freq(a), cum(a);
    uint32_t* rec = out + rec_off[t];
    if (counts[t] == 0) { rec[0] = 0; rec_len[t] = 1; continue; }
    if (a <= 0 || a > 256 || !normalize(freqs + freq_off[t], a, freq.data(), cum.data())) { err = -(t + 1); continue; }
    int64_t cap16 = 2 * (rec_cap[t] - 1);
    uint16_t* buf16 = reinterpret_cast<uint16_t*>(rec + 1);
    int64_t n16 = encode_table(sym + sym_off[t], counts[t], freq.data(), cum.data(), a, buf16, cap16);
    if (n16 < 0) { err = -(t + 1); continue; }
    std::memmove(buf16, buf16 + cap16 - n16, static_cast<size_t>(n16) * 2);
    if (n16 & 1) buf16[n16] = 0;
    rec[0] = static_cast<uint32_t>(n16);
    rec_len[t] = 1 + (n16 + 1) / 2;
  }
  return err;
}

// Decodes every segment (tables_per_seg tables each) into out (u8 symbols at sym_off[t]).
// Returns 0, or -(segment + 1) for the first corrupt segment found.
int64_t kvpipe_rans_decode(const uint32_t* words, const int64_t* seg_off, int64_t nseg, int64_t tables_per_seg,
                           const int64_t* alph, const int64_t* sym_off, const int64_t* counts,
                           const uint16_t* freqs, const int64_t* freq_off, uint8_t* out, int nthreads) {
  int64_t err = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) reduction(min : err)
  for (int64_t s = 0; s < nseg; ++s) {
    const uint32_t* p = words + seg_off[s];
    const uint32_t* end = words + seg_off[s + 1];
    uint32_t freq[256], cum[256];
    std::vector<uint32_t> slots(kProbScale);
    for (int64_t k = 0; k < tables_per_seg; ++k) {
      int64_t t = s * tables_per_seg + k;
      if (p >= end) { err = -(s + 1); break; }
      int64_t n16 = *p++;
      int64_t nw = (n16 + 1) / 2;
      if (nw > end - p) { err = -(s + 1); break; }
      if (counts[t] == 0) { p += nw; continue; }
      int64_t a = alph[t];
      if (a <= 0 || a > 256 || !normalize(freqs + freq_off[t], a, freq, cum)) { err = -(s + 1); break; }
      const uint16_t* in16 = reinterpret_cast<const uint16_t*>(p);
      int rc;
      if (counts[t] < kSmallTable) {
        rc = decode_table_small(in16, n16, counts[t], freq, cum, a, out + sym_off[t]);
      } else {
        build_slots(freq, cum, a, slots.data());
        rc = decode_table(in16, n16, counts[t], slots.data(), out + sym_off[t]);
      }
      if (rc != 0) {
        err = -(s + 1);
        break;
      }
      p += nw;
    }
    if (err == 0 && p != end) err = -(s + 1);
  }
  return err;
}

// Fused decode + dequantize of a lossy container straight into the output tensor ([L, S, T, C], C-contiguous),
// one pass per element. Per segment (l, s): the anchor table (Ta x C symbols), then C / tg delta tables of
// T x tg symbols each; x = q * dscale + bias, with bias = reference - h * dscale, where the reference is the
// anchor reconstruction on anchor rows and, elsewhere, the anchor (use_delta) or the mid-range. out_dtype:
// 1 = fp16, 2 = bf16, 3 = fp32. Returns 0 or -(segment + 1).
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x47800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax < 0x38800000u) {  // fp16 subnormal or zero: round at 2^-24 (default rounding mode: nearest even)
    float af;
    std::memcpy(&af, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::lrintf(af * 16777216.0f)));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent by -112, round to nearest even
  return static_cast<uint16_t>(sign | (ax >> 13));
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

#ifdef KVPIPE_X86
// One row of tg dequantized values, 8 at a time with AVX2 (+ F16C for fp16). Multiply then add, never fused, so
// the results are bit-identical to the scalar loop and to torch's path; hardware fp16 conversion rounds to
// nearest even like f32_to_f16. Returns the number of elements done (a multiple of 8); the caller finishes.
__attribute__((target("avx2,f16c"))) static int64_t dequant_row_avx2(const uint8_t* q, const float* sc,
                                                                    const float* b, void* dst, int64_t n,
                                                                    int out_dtype) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8)), _mm256_loadu_ps(sc + j)),
                             _mm256_loadu_ps(b + j));
    if (out_dtype == 3) {
      _mm256_storeu_ps(static_cast<float*>(dst) + j, v);
    } else if (out_dtype == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + j),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      __m256i x = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
      x = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
      __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + j), packed);
    }
  }
  return j;
}

static bool have_avx2_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

int64_t kvpipe_cg_decode_lossy(const uint32_t* words, const int64_t* seg_off, int64_t nseg, int64_t tables_per_seg,
                               const int64_t* alph, const int64_t* counts, const uint16_t* freqs,
                               const int64_t* freq_off, int64_t T, int64_t C, int64_t G, int64_t tg, int64_t ah,
                               const uint8_t* half, const float* ascale, const float* dscale, const float* mid,
                               const uint8_t* use_delta, void* out, int out_dtype, int nthreads) {
  int64_t err = 0;
  const int64_t Ta = (T + G - 1) / G;
  const int64_t ng = C / tg;
  if (tables_per_seg != 1 + ng) return -1;
#ifdef KVPIPE_X86
  const bool simd = have_avx2_f16c();
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) reduction(min : err)
  for (int64_t s = 0; s < nseg; ++s) {
    const uint32_t* p = words + seg_off[s];
    const uint32_t* end = words + seg_off[s + 1];
    uint32_t freq[256], cum[256];
    std::vector<uint32_t> slots(kProbScale);
    std::vector<uint8_t> abuf(static_cast<size_t>(Ta * C)), dbuf(static_cast<size_t>(T * tg));
    std::vector<float> bias_anchor(static_cast<size_t>(Ta * C)), bias_rest(static_cast<size_t>(Ta * C));
    const float* as = ascale + s * C;
    const float* ds = dscale + s * C;
    const float* md = mid + s * C;
    const uint8_t* ud = use_delta + s * C;
    const float h = static_cast<float>(half[s]);
    bool ok = true;
    for (int64_t k = 0; k < tables_per_seg && ok; ++k) {
      int64_t t = s * tables_per_seg + k;
      if (p >= end) { ok = false; break; }
      int64_t n16 = *p++;
      int64_t nw = (n16 + 1) / 2;
      if (nw > end - p) { ok = false; break; }
      int64_t a = alph[t];
      int64_t n = counts[t];
      if (n != (k == 0 ? Ta * C : T * tg) || a <= 0 || a > 256 ||
          !normalize(freqs + freq_off[t], a, freq, cum)) { ok = false; break; }
      uint8_t* dst = k == 0 ? abuf.data() : dbuf.data();
      const uint16_t* in16 = reinterpret_cast<const uint16_t*>(p);
      int rc;
      if (n < kSmallTable) {
        rc = decode_table_small(in16, n16, n, freq, cum, a, dst);
      } else {
        build_slots(freq, cum, a, slots.data());
        rc = decode_table(in16, n16, n, slots.data(), dst);
      }
      if (rc != 0) {
        ok = false;
        break;
      }
      p += nw;
      if (k == 0) {
        for (int64_t r = 0; r < Ta; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            float ahat = (static_cast<float>(abuf[r * C + c]) - static_cast<float>(ah)) * as[c];
            float shift = h * ds[c];
            bias_anchor[r * C + c] = ahat - shift;
            bias_rest[r * C + c] = (ud[c] ? ahat : md[c]) - shift;
          }
        }
        continue;
      }
      const int64_t c0 = (k - 1) * tg;
      for (int64_t tok = 0; tok < T; ++tok) {
        const int64_t r = tok / G;
        const float* b = (tok % G == 0 ? bias_anchor.data() : bias_rest.data()) + r * C + c0;
        const float* sc = ds + c0;
        const uint8_t* q = dbuf.data() + tok * tg;
        const int64_t o = (s * T + tok) * C + c0;
        int64_t j0 = 0;
#ifdef KVPIPE_X86
        if (simd) {
          const size_t esz = out_dtype == 3 ? 4 : 2;
          j0 = dequant_row_avx2(q, sc, b, static_cast<char*>(out) + o * static_cast<int64_t>(esz), tg, out_dtype);
        }
#endif
        if (j0 == tg) continue;
        if (out_dtype == 3) {
          float* dstf = static_cast<float*>(out) + o;
          for (int64_t j = j0; j < tg; ++j) dstf[j] = static_cast<float>(q[j]) * sc[j] + b[j];
        } else if (out_dtype == 1) {
          uint16_t* dsth = static_cast<uint16_t*>(out) + o;
          for (int64_t j = j0; j < tg; ++j) dsth[j] = f32_to_f16(static_cast<float>(q[j]) * sc[j] + b[j]);
        } else {
          uint16_t* dstb = static_cast<uint16_t*>(out) + o;
          for (int64_t j = j0; j < tg; ++j) dstb[j] = f32_to_bf16(static_cast<float>(q[j]) * sc[j] + b[j]);
        }
      }
    }
    if (!ok || p != end) err = -(s + 1);
  }
  return err;
}

}  // extern "C"
