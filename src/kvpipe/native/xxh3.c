/* XXH3-64 (seed 0, default secret) of inputs longer than 240 bytes, written from the XXH3 specification, for
 * kvpipe's payload checksum. It computes the same value as python-xxhash's xxh3_64 (the tests check this over
 * many lengths and contents); what differs is how it is called: through ctypes, which releases the GIL, so a
 * payload can be hashed on one core while the event loop sends it on the other.
 *
 * Shorter inputs are not handled here (the caller hashes them with python-xxhash): payloads are kilobytes to
 * megabytes. On x86-64 with AVX2 (checked at run time) the stripes go through 256-bit lanes; elsewhere a plain
 * C loop does the same arithmetic.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define STRIPE 64
#define SECRET_SIZE 192
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE) / 8)
#define BLOCK (STRIPE * STRIPES_PER_BLOCK)

static const uint8_t kSecret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define P32_1 0x9E3779B1U
#define P32_2 0x85EBCA77U
#define P32_3 0xC2B2AE3DU
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P64_4 0x85EBCA77C2B2AE63ULL
#define P64_5 0x27D4EB2F165667C5ULL
#define MX1 0x165667919E3779F9ULL

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian host (x86-64, aarch64) */
    return v;
}

/* One 64-byte stripe into the eight lanes. */
static inline void accumulate_512(uint64_t acc[8], const uint8_t *in, const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t v = rd64(in + 8 * i);
        uint64_t k = v ^ rd64(secret + 8 * i);
        acc[i ^ 1] += v;
        acc[i] += (uint64_t)(uint32_t)k * (k >> 32);
    }
}

static inline void scramble(uint64_t acc[8], const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= rd64(secret + 8 * i);
        acc[i] = a * P32_1;
    }
}

static inline uint64_t mul128_fold64(uint64_t a, uint64_t b) {
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t avalanche(uint64_t h) {
    h ^= h >> 37;
    h *= MX1;
    return h ^ (h >> 32);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void blocks_avx2(uint64_t acc[8], const uint8_t *in, size_t nb_blocks) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc), a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    const __m256i prime = _mm256_set1_epi32((int)P32_1);
    for (size_t b = 0; b < nb_blocks; b++) {
        const uint8_t *blk = in + b * BLOCK;
        for (int s = 0; s < STRIPES_PER_BLOCK; s++) {
            const uint8_t *p = blk + s * STRIPE, *k = kSecret + s * 8;
            __m256i d0 = _mm256_loadu_si256((const __m256i *)p), d1 = _mm256_loadu_si256((const __m256i *)(p + 32));
            __m256i k0 = _mm256_xor_si256(d0, _mm256_loadu_si256((const __m256i *)k));
            __m256i k1 = _mm256_xor_si256(d1, _mm256_loadu_si256((const __m256i *)(k + 32)));
            __m256i m0 = _mm256_mul_epu32(k0, _mm256_srli_epi64(k0, 32));
            __m256i m1 = _mm256_mul_epu32(k1, _mm256_srli_epi64(k1, 32));
            a0 = _mm256_add_epi64(a0, _mm256_add_epi64(m0, _mm256_shuffle_epi32(d0, _MM_SHUFFLE(1, 0, 3, 2))));
            a1 = _mm256_add_epi64(a1, _mm256_add_epi64(m1, _mm256_shuffle_epi32(d1, _MM_SHUFFLE(1, 0, 3, 2))));
        }
        const uint8_t *k = kSecret + SECRET_SIZE - STRIPE;
        __m256i x0 = _mm256_xor_si256(_mm256_xor_si256(a0, _mm256_srli_epi64(a0, 47)),
                                      _mm256_loadu_si256((const __m256i *)k));
        __m256i x1 = _mm256_xor_si256(_mm256_xor_si256(a1, _mm256_srli_epi64(a1, 47)),
                                      _mm256_loadu_si256((const __m256i *)(k + 32)));
        a0 = _mm256_add_epi64(_mm256_mul_epu32(x0, prime),
                              _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x0, 32), prime), 32));
        a1 = _mm256_add_epi64(_mm256_mul_epu32(x1, prime),
                              _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x1, 32), prime), 32));
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}
#endif

static void blocks_scalar(uint64_t acc[8], const uint8_t *in, size_t nb_blocks) {
    for (size_t b = 0; b < nb_blocks; b++) {
        const uint8_t *blk = in + b * BLOCK;
        for (int s = 0; s < STRIPES_PER_BLOCK; s++) accumulate_512(acc, blk + s * STRIPE, kSecret + s * 8);
        scramble(acc, kSecret + SECRET_SIZE - STRIPE);
    }
}

/* XXH3-64 of ``len`` (> 240) bytes at ``in``. */
uint64_t kvpipe_xxh3_64_long(const uint8_t *in, int64_t len_) {
    size_t len = (size_t)len_;
    uint64_t acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
    size_t nb_blocks = (len - 1) / BLOCK;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2"))
        blocks_avx2(acc, in, nb_blocks);
    else
#endif
        blocks_scalar(acc, in, nb_blocks);
    size_t nb_stripes = ((len - 1) - BLOCK * nb_blocks) / STRIPE;
    const uint8_t *tail = in + nb_blocks * BLOCK;
    for (size_t s = 0; s < nb_stripes; s++) accumulate_512(acc, tail + s * STRIPE, kSecret + s * 8);
    accumulate_512(acc, in + len - STRIPE, kSecret + SECRET_SIZE - STRIPE - 7);
    uint64_t h = (uint64_t)len * P64_1;
    for (int i = 0; i < 4; i++)
        h += mul128_fold64(acc[2 * i] ^ rd64(kSecret + 11 + 16 * i), acc[2 * i + 1] ^ rd64(kSecret + 11 + 16 * i + 8));
    return avalanche(h);
}
