"""The torch engine's decoding step fused into a few C kernels (``sample(..., compile=True)``).

The eager step (``sampler._LlamaLike``) runs dozens of small torch ops per layer; at the
rollout's sizes (the 0.9M-parameter default, 128 rows) about half of its time is per-op
overhead and attention split into many tiny batched matmuls. This step leaves the matrix
products to torch (oneDNN or MKL, whichever ``onednn`` picks for the CPU), with q/k/v and
gate/up each concatenated into one product, and replaces everything between them with four
kernels: RMS norm; RoPE plus the KV-cache write plus attention over the prompt and completion
caches; SiLU(gate) * up; and the sampler's choice
(log-softmax, then argmax or the same inverse-CDF draw as ``sampler._draw``, fed the same
uniforms). A layer is 8 calls; attention reads each cached key and value once. Where the
products are torch's own MKL ones (Intel CPUs; no biases), the whole step is one C call
(``decode_step``), its products by the sgemm torch.mm calls, found in libtorch and checked
against torch.mm bit for bit once per shape: the same results with no Python between kernels.

What bounds it now: the matrix products, near a large fp32 matmul's rate, and attention, which
reads every row's completion cache once a step; it asks for the next head's cache lines a few
at a time while it computes, so that memory and arithmetic overlap
(docs/results/performance.md). ``kv_cache="float16"`` (a build of its own, ``KV_HALF``) caches
keys and values as half floats, rounded once and widened as they are read: half the bytes for
attention to stream; fp32 stays the default.

The kernels are plain C, built per machine and head size with the system C compiler (``$CC``,
else gcc or cc) into the ahamoment cache (``kernels/``), keyed by the source, the compiler and
the CPU, and loaded with ctypes: a compile the first time, a ``dlopen`` afterwards. No shapes
are compiled in, so batch size, prompt and completion lengths never rebuild anything.
The trainer's kernels (``stream_attention``, ``fused_ops``, the adapters' one-pass gradients)
are a second library from the same machinery (``kernels(part="train")``), built apart so that
a rollout never waits for their compile.
Attention and SiLU split their rows over torch's thread count with OpenMP, on torch's own
thread pool: the build links the runtime torch already loaded (libgomp on Linux). Where it
cannot (no OpenMP, or a second runtime would be loaded), they run on the calling thread; the
matrix products always use torch's threads.

Why not ``torch.compile``: inductor's CPU code for the same step recomputed RoPE inside every
dot product of its attention and summed each dot horizontally, and took far longer to compile
than a rollout takes; these kernels ran faster (docs/results/performance.md).

Where the fused step cannot run, decoding is eager, after one warning line: no working C
compiler, a model other than fp32 on CPU, or one whose layers are not the plain Llama/Qwen2/
Mistral ones (LoRA-wrapped projections, biases other than q/k/v, an activation other than SiLU,
a RoPE whose frequencies depend on the sequence length, a sliding window shorter than the
sequence). Results agree with eager to float rounding, not bit for bit: each kernel sums in its
own order (``tests/test_compiled_decode.py``).

Layout: the prompt cache holds each distinct prompt once, as in the eager sampler; slot s reads
prompt ``rp[s]``. The completion cache has one row per sequence; slot s owns row ``cr[s]``. Keys are stored in tiles of 8
columns, transposed, (..., ceil(T / 8), D, 8), so that 8 scores are 8-wide multiply-adds with
no horizontal sums; values stay (..., T, D). The cache is never zero-filled up front (only
written columns are read; a key tile is zeroed when its first column is written), so an
evaluation batch whose rows stop early never makes it all resident. Finished rows ride along
until a quarter of the slots are free, then the live slots are compacted (the eager sampler's
rule); their cache rows are not copied, only the slot → row map.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ahamoment import decoder, onednn
from ahamoment.models import cache_dir

__all__ = ["SPARE", "FusedLlama", "fused_runner", "kernels", "lora_grads", "trainer_kernels"]

_C_HEADER = r"""
/* Shared by the decoding step's kernels and the trainer's: fp32, CPU, contiguous tensors.
   Plain C: gcc vectorizes the loops marked `omp simd` (-fopenmp-simd), and the GNU vector
   types below (v16, vtile) become the machine's vectors, or pairs of them (one intrinsic, for
   half-precision caches where the CPU has F16C). No
   -ffast-math, so the process's floating-point mode and inf/NaN semantics stay as they are. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#define TILE 8

/* The element of the decoding step's key/value caches: IEEE half floats in a KV_HALF build where
   the compiler has _Float16 (half the bytes for attention to stream; values are rounded once,
   when cached, and computed on in fp32), else fp32. The trainer's build is fp32. */
#if defined(KV_HALF) && KV_HALF && defined(__FLT16_MAX__)
#define KV_IS_HALF 1
typedef _Float16 kv_t;
#else
#define KV_IS_HALF 0
typedef float kv_t;
#endif

/* exp(x), 16 lanes at a time: Cephes' expf (2^n e^r, |r| <= ln2 / 2, degree-6 polynomial; about
   1 ulp), with x clamped to [-87, 88] so that 2^n stays a normal float (exp(-87) = 1.6e-38 stands
   in for anything smaller; it is 0 next to the 1 of the softmax's maximum). Written for GNU
   vectors: gcc's own vectorization of the same scalar code in an `omp simd` loop ran about 3x
   slower. */
typedef float v16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t vi16 __attribute__((vector_size(16 * sizeof(int32_t))));

/* The first min(m, 16) floats at p (the other lanes 0), and back; a whole vector is one move. */
INLINE v16 loadn(const float *p, int64_t m) {
    v16 x = {0};
    if (m >= 16)
        memcpy(&x, p, sizeof x);
    else
        memcpy(&x, p, m * sizeof(float));
    return x;
}
INLINE void storen(float *p, v16 x, int64_t m) {
    if (m >= 16)
        memcpy(p, &x, sizeof x);
    else
        memcpy(p, &x, m * sizeof(float));
}

/* Lane-wise: a where m (all ones), else b. */
INLINE v16 select16(vi16 m, v16 a, v16 b) { return (v16)((m & (vi16)a) | (~m & (vi16)b)); }

INLINE v16 exp_v(v16 x) {
    x = select16(x < -87.0f, (v16){0} - 87.0f, x);
    x = select16(x > 88.0f, (v16){0} + 88.0f, x);
    /* n = round(x / ln2) by the 1.5 * 2^23 shifter: its low mantissa bits hold n */
    const v16 shifted = x * 1.44269504088896341f + 12582912.0f, n = shifted - 12582912.0f;
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    const v16 p = ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                      4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) *
                   (r * r) + r + 1.0f);
    return p * (v16)(((vi16)shifted - 0x4B400000 + 127) << 23); /* times 2^n */
}

/* silu(g) = g sigmoid(g), as HF's SiLU: g / (1 + exp(-g)). */
INLINE v16 silu_v(v16 g) { return g / (1.0f + exp_v(-g)); }

#define OUTLINE static __attribute__((noinline)) /* one copy, not one per caller: a shorter build */

/* y[j] = exp(x[j] - shift) for j < n (y may be x). */
OUTLINE void exp_shift_rows(const float *x, float *y, float shift, int64_t n) {
    for (int64_t j = 0; j < n; j += 16) storen(y + j, exp_v(loadn(x + j, n - j) - shift), n - j);
}

/* One row of the RMS norm: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps); returns r. */
INLINE float rms_row(const float *restrict x, const float *restrict w, float *restrict y,
                     int64_t C, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; c++) ss += x[c] * x[c];
    const float r = 1.0f / sqrtf(ss / (float)C + eps);
#pragma omp simd
    for (int64_t c = 0; c < C; c++) y[c] = w[c] * (x[c] * r);
    return r;
}

/* a[i] = silu(g[i]) * u[i] for i < n. */
OUTLINE void silu_mul_rows(const float *restrict g, const float *restrict u, float *restrict a,
                           int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        storen(a + i, silu_v(loadn(g + i, n - i)) * loadn(u + i, n - i), n - i);
}

/* HF's rotate_half RoPE of one head x (D,): x * cos + rotate_half(x) * sin. */
INLINE void rope(const float *restrict x, const float *restrict c, const float *restrict sn,
                 float *restrict out, int64_t D) {
    const int64_t h = D / 2;
#pragma omp simd
    for (int64_t d = 0; d < h; d++) out[d] = x[d] * c[d] - x[d + h] * sn[d];
#pragma omp simd
    for (int64_t d = h; d < D; d++) out[d] = x[d] * c[d] + x[d - h] * sn[d];
}

/* Key tiles, TILE lanes (widened from the cache's element: kvtile). */
typedef float vtile __attribute__((vector_size(TILE * sizeof(float))));
typedef int32_t vitile __attribute__((vector_size(TILE * sizeof(int32_t))));

/* TILE cached floats as fp32. Halves: by F16C's vcvtph2ps where the build has it (gcc 12
   turns __builtin_convertvector from _Float16 into one conversion per lane), else by integer
   ops: a half's bits shifted into a float's place read as the same number times 2^-112
   (subnormals and zero included), so one product restores it; then the sign goes back. */
#if KV_IS_HALF
typedef uint16_t kvtile __attribute__((vector_size(TILE * sizeof(uint16_t))));
#if defined(__F16C__) && TILE == 8
#include <immintrin.h>
INLINE vtile widen_tile(kvtile h) {
    __m128i x;
    memcpy(&x, &h, sizeof x);
    return (vtile)_mm256_cvtph_ps(x);
}
#else
INLINE vtile widen_tile(kvtile h) {
    const vitile w = __builtin_convertvector(h, vitile);
    const vtile mag = (vtile)((w & 0x7fff) << 13) * 0x1p112f;
    return (vtile)((vitile)mag | ((w & 0x8000) << 16));
}
#endif
#else
typedef float kvtile __attribute__((vector_size(TILE * sizeof(float))));
INLINE vtile widen_tile(kvtile h) { return h; }
#endif

/* TILE cached floats at p, as fp32. */
INLINE vtile load_tile(const kv_t *p) {
    kvtile x;
    memcpy(&x, p, sizeof x);
    return widen_tile(x);
}

/* Cache lines to prefetch while computing on others: the range p .. end, then p2 .. end2.
   Each step asks for one line; NULL (the trainer's, whose data is in cache) asks for none.
   Spreading the requests over the arithmetic keeps memory and the FMA units busy together; a
   burst of a whole range at once stalled on the core's few outstanding-miss slots. */
struct ahead {
    const char *p, *end, *p2, *end2;
};
INLINE void ahead_step(struct ahead *a) {
    if (!a)
        return;
    if (a->p < a->end) {
        __builtin_prefetch(a->p, 0, 1);
        a->p += 64;
    } else if (a->p2 < a->end2) {
        __builtin_prefetch(a->p2, 0, 1);
        a->p2 += 64;
    }
}

/* out[l] = q . key l, for the 8 keys of one tile kt (D, 8): 8-wide multiply-adds, no
   horizontal sums. */
INLINE void tile_scores(const float *restrict q, const kv_t *restrict kt, float *restrict out,
                        int64_t D) {
    vtile acc = {0};
    for (int64_t d = 0; d < D; d++) acc += q[d] * load_tile(kt + d * TILE);
    memcpy(out, &acc, sizeof acc);
}

/* tile_scores of n consecutive tiles, 4 at a time (independent sums keep the FMA units busy
   instead of waiting on one chain of D multiply-adds); one prefetch step of pf per 4 columns. */
INLINE void tiles_scores(const float *restrict q, const kv_t *restrict kt, float *restrict out,
                         int64_t n, int64_t D, struct ahead *pf) {
    int64_t b = 0;
    for (; b + 4 <= n; b += 4) {
        vtile a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const kv_t *k0 = kt + b * D * TILE;
        for (int64_t d = 0; d < D; d++) {
            ahead_step(pf);
            a0 += q[d] * load_tile(k0 + d * TILE);
            a1 += q[d] * load_tile(k0 + (D + d) * TILE);
            a2 += q[d] * load_tile(k0 + (2 * D + d) * TILE);
            a3 += q[d] * load_tile(k0 + (3 * D + d) * TILE);
        }
        memcpy(out + b * TILE, &a0, sizeof a0);
        memcpy(out + (b + 1) * TILE, &a1, sizeof a1);
        memcpy(out + (b + 2) * TILE, &a2, sizeof a2);
        memcpy(out + (b + 3) * TILE, &a3, sizeof a3);
    }
    for (; b < n; b++) tile_scores(q, kt + b * D * TILE, out + b * TILE, D);
}

/* s[j] = exp(s[j] - max) in place over n scores; returns their sum, the max in *mx. */
INLINE float exp_shifted(float *restrict s, int64_t n, float *restrict mx) {
    float m = s[0], z = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    exp_shift_rows(s, s, m, n);
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; j++) z += s[j];
    *mx = m;
    return z;
}

/* TILE cached floats at p, as fp32: the first min(m, TILE) of them, the other lanes 0. */
INLINE vtile load_tilen(const kv_t *p, int64_t m) {
    if (m >= TILE)
        return load_tile(p);
    kvtile x = {0};
    memcpy(&x, p, m * sizeof(kv_t));
    return widen_tile(x);
}

/* acc += sum_j p[j] v[j] over n rows v (n, D), four rows at a time into four partial sums
   (one chain of n dependent multiply-adds would wait on each). Half caches: TILE lanes of D
   at a time, widened as they are read (a head's rows stay in L1 for the next lanes); the same
   sums in the same order as fp32's loop over all of D, which was faster for fp32. One prefetch
   step of pf per two rows. */
INLINE void weighted_rows(const float *restrict p, const kv_t *restrict v, int64_t n,
                           float *restrict acc, int64_t D, struct ahead *pf) {
#if KV_IS_HALF
    for (int64_t d = 0; d < D; d += TILE) {
        const int64_t m = D - d < TILE ? D - d : TILE;
        vtile a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, cur = {0};
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const kv_t *v0 = v + j * D + d;
            ahead_step(pf);
            a0 += p[j] * load_tilen(v0, m);
            a1 += p[j + 1] * load_tilen(v0 + D, m);
            a2 += p[j + 2] * load_tilen(v0 + 2 * D, m);
            a3 += p[j + 3] * load_tilen(v0 + 3 * D, m);
        }
        for (; j < n; j++) a0 += p[j] * load_tilen(v + j * D + d, m);
        memcpy(&cur, acc + d, m * sizeof(float));
        cur += (a0 + a1) + (a2 + a3);
        memcpy(acc + d, &cur, m * sizeof(float));
    }
#else
    float a0[D], a1[D], a2[D], a3[D];
    memset(a0, 0, sizeof a0), memset(a1, 0, sizeof a1);
    memset(a2, 0, sizeof a2), memset(a3, 0, sizeof a3);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *v0 = v + j * D;
        ahead_step(pf);
        ahead_step(pf);
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            a0[d] += p[j] * v0[d];
            a1[d] += p[j + 1] * v0[D + d];
            a2[d] += p[j + 2] * v0[2 * D + d];
            a3[d] += p[j + 3] * v0[3 * D + d];
        }
    }
    for (; j < n; j++)
#pragma omp simd
        for (int64_t d = 0; d < D; d++) a0[d] += p[j] * v[j * D + d];
#pragma omp simd
    for (int64_t d = 0; d < D; d++) acc[d] += (a0[d] + a1[d]) + (a2[d] + a3[d]);
#endif
}
"""

_C_DECODE_ATTN = r"""
/* One decoding step of a Llama-style decoder: attention. */
/* One kv head g of one slot: see attn_decode. sc: (H / Hkv) rows of nmax + 2 TILE floats. */
INLINE void attn_head(const float *restrict row, const float *restrict c,
                      const float *restrict sn, kv_t *restrict kcg, kv_t *restrict vcg,
                      const kv_t *restrict kpg, const kv_t *restrict vpg, float *restrict o,
                      float *restrict q, float *restrict sc, int64_t g, int64_t H, int64_t Hkv,
                      int64_t D, int64_t Lp, int64_t p0, int64_t t, int64_t nmax,
                      float scaling, struct ahead *pf) {
    const int64_t rep = H / Hkv, np = Lp - p0, n = np + t + 1;
    /* the new key, rotated, into column t (tile t / 8, lane t % 8); the new value into row t */
    float k[D];
    rope(row + (H + g) * D, c, sn, k, D);
    kv_t *kt = kcg + (t / TILE) * D * TILE;
    if (t % TILE == 0) /* a fresh tile: its unwritten lanes are computed on, so make them 0 */
        memset(kt, 0, D * TILE * sizeof(kv_t));
    for (int64_t d = 0; d < D; d++) kt[d * TILE + t % TILE] = (kv_t)k[d];
    const float *vnew = row + (H + Hkv + g) * D;
    for (int64_t d = 0; d < D; d++) vcg[t * D + d] = (kv_t)vnew[d];
    for (int64_t r = 0; r < rep; r++) {
        float *qr = q + r * D;
        rope(row + (g * rep + r) * D, c, sn, qr, D);
#pragma omp simd
        for (int64_t d = 0; d < D; d++) qr[d] *= scaling;
    }
    const int64_t pt0 = p0 / TILE, ptn = (Lp + TILE - 1) / TILE, ctn = t / TILE + 1;
    for (int64_t r = 0; r < rep; r++) {
        /* scores of the valid prompt columns p0 .. Lp-1, then of completion columns 0 .. t, at
           sr[0 .. n-1]. Whole tiles are written: a prompt tile's lanes before p0 land in the
           TILE floats of headroom before sr, and those after Lp-1 are overwritten by the
           completion tiles, whose lanes after t are never read. */
        const float *qr = q + r * D;
        float *sr = sc + r * (nmax + 2 * TILE) + TILE;
        tiles_scores(qr, kpg + pt0 * D * TILE, sr + pt0 * TILE - p0, ptn - pt0, D, pf);
        tiles_scores(qr, kcg, sr + np, ctn, D, pf);
        float m;
        const float z = exp_shifted(sr, n, &m);
        float acc[D];
        memset(acc, 0, sizeof acc);
        weighted_rows(sr, vpg + p0 * D, np, acc, D, pf);
        weighted_rows(sr + np, vcg, t + 1, acc, D, pf);
        const float inv = 1.0f / z;
        float *orr = o + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) orr[d] = acc[d] * inv;
    }
}

/* Attention of one new token per slot s.
   qkv (S, (H + 2 Hkv) D): the new token's q, k, v projections, before RoPE.
   cos_t, sin_t (P, D): the model's rotary table; slot s is at position pos[s].
   kc (B, Hkv, ceil(T / 8), D, 8), vc (B, Hkv, T, D): this layer's completion cache, keys in
   tiles of 8 columns, transposed; slot s owns its row cr[s]. Column t receives the new key
   (rotated) and value; the slot then attends to columns 0 .. t.
   kp (U, Hkv, ceil(Lp / 8), D, 8), vp (U, Hkv, Lp, D): this layer's prompt cache. Slot s reads
   prompt rp[s], whose valid columns are pstart[rp[s]] .. Lp-1 (prompts are left-padded).
   out (S, H D): softmax(q k^T * scaling) v, heads in model order (head h reads kv head
   h / (H / Hkv)). scratch: nthreads blocks of per_thread >= attn_decode_per_thread(...)
   floats. Slots are split over nthreads OpenMP threads (each slot's arithmetic is the same
   whatever the split, so results do not depend on it). */
void attn_decode(const float *restrict qkv, const float *restrict cos_t,
                 const float *restrict sin_t, const int64_t *restrict pos, kv_t *restrict kc,
                 kv_t *restrict vc, const kv_t *restrict kp, const kv_t *restrict vp,
                 const int64_t *restrict rp, const int64_t *restrict pstart,
                 const int64_t *restrict cr, float *restrict out, float *restrict scratch, int64_t per_thread,
                 int64_t nthreads, int64_t S, int64_t H, int64_t Hkv, int64_t D, int64_t T,
                 int64_t Lp, int64_t t, float scaling) {
    const int64_t rep = H / Hkv, stride = (H + 2 * Hkv) * D, nmax = Lp + T;
    const int64_t kstride = (T + TILE - 1) / TILE * TILE * D;
    const int64_t pkstride = (Lp + TILE - 1) / TILE * TILE * D;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && S >= 8)
#endif
    for (int64_t s = 0; s < S; s++) {
#ifdef _OPENMP
        float *q = scratch + omp_get_thread_num() * per_thread;
#else
        float *q = scratch;
#endif
        float *sc = q + rep * D;
        const float *c = cos_t + pos[s] * D, *sn = sin_t + pos[s] * D, *row = qkv + s * stride;
        const int64_t u = rp[s], p0 = pstart[u];
        for (int64_t g = 0; g < Hkv; g++) {
            kv_t *kcg = kc + (cr[s] * Hkv + g) * kstride, *vcg = vc + (cr[s] * Hkv + g) * T * D;
            const kv_t *kpg = kp + (u * Hkv + g) * pkstride, *vpg = vp + (u * Hkv + g) * Lp * D;
            float *o = out + (s * H + g * rep) * D;
            /* while this head computes, ask for its values (read after its scores), then for
               the next head's keys, so that their memory latency overlaps the arithmetic */
            const kv_t *nk = g + 1 < Hkv  ? kcg + kstride
                             : s + 1 < S ? kc + cr[s + 1] * Hkv * kstride
                                         : NULL;
            struct ahead pf = {(const char *)vcg, (const char *)(vcg + t * D), (const char *)nk,
                               nk ? (const char *)(nk + (t / TILE + 1) * TILE * D) : NULL};
            /* the model's head size is built in (D == HEAD_DIM: FusedLlama checks), so the
               loops unroll fully; no generic copy, which doubled the build's time */
            attn_head(row, c, sn, kcg, vcg, kpg, vpg, o, q, sc, g, H, Hkv, HEAD_DIM, Lp, p0, t,
                      nmax, scaling, &pf);
        }
    }
}

/* Floats of attn_decode's scratch per thread: (H / Hkv) (D + Lp + T + 2 TILE). */
int64_t attn_decode_per_thread(int64_t H, int64_t Hkv, int64_t D, int64_t Lp, int64_t T) {
    return H / Hkv * (D + Lp + T + 2 * TILE);
}
"""

_C_DECODE = r"""
/* One decoding step of a Llama-style decoder. */
/* y = w * x / sqrt(mean(x^2) + eps), row by row: x, y (S, C), w (C,). */
void rmsnorm(const float *restrict x, const float *restrict w, float *restrict y, int64_t S,
             int64_t C, float eps) {
    for (int64_t s = 0; s < S; s++) {
        rms_row(x + s * C, w, y + s * C, C, eps);
    }
}

/* a = silu(gu[:, :I]) * gu[:, I:]: gu (S, 2I), a (S, I); rows split over nthreads. */
void silu_mul(const float *restrict gu, float *restrict a, int64_t S, int64_t I,
              int64_t nthreads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && S >= 16)
#endif
    for (int64_t s = 0; s < S; s++) {
        silu_mul_rows(gu + s * 2 * I, gu + s * 2 * I + I, a + s * I, I);
    }
}

/* Bytes of one cached key or value float: 2 (half) or 4. */
int64_t kv_bytes(void) { return sizeof(kv_t); }

/* Key columns per tile of the caches' key layout. */
int64_t key_tile(void) { return TILE; }

/* The head size attn_decode was built for (its D argument must equal it). */
int64_t decode_head_dim(void) { return HEAD_DIM; }

/* The sampler's choice for each row of logits (S, V), as rollout/sampler.py makes it eagerly:
   x = logits / scale, log-probs log_softmax(x). A greedy row takes the first argmax of the
   log-probs; another takes the first token whose cumulative probability (summed in double, as
   torch.cumsum does for float) exceeds uni * total, kept strictly below total (sampler._draw).
   tok, lp (S,): the token and its log-prob. buf: 2 V floats. */
void sample_rows(const float *restrict logits, const float *restrict scale,
                 const uint8_t *restrict greedy, const float *restrict uni,
                 int64_t *restrict tok, float *restrict lp, float *restrict buf, int64_t S,
                 int64_t V) {
    float *x = buf, *e = buf + V;
    for (int64_t s = 0; s < S; s++) {
        const float *l = logits + s * V, temp = scale[s];
        float m = -INFINITY, z = 0.0f;
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < V; i++) {
            x[i] = l[i] / temp;
            m = x[i] > m ? x[i] : m;
        }
        exp_shift_rows(x, e, m, V);
#pragma omp simd reduction(+ : z)
        for (int64_t i = 0; i < V; i++) z += e[i];
        const float lz = logf(z);
        int64_t k = 0;
        if (greedy[s]) {
            float best = (x[0] - m) - lz;
            for (int64_t i = 1; i < V; i++) {
                const float v = (x[i] - m) - lz;
                if (v > best) best = v, k = i;
            }
        } else {
            double acc = 0.0;
            for (int64_t i = 0; i < V; i++) acc += (double)(e[i] / z);
            const float total = (float)acc, below = nextafterf(total, 0.0f);
            float target = uni[s] * total;
            target = target < below ? target : below;
            acc = 0.0;
            for (k = 0; k < V - 1; k++) {
                acc += (double)(e[k] / z);
                if ((float)acc > target) break;
            }
        }
        tok[s] = k;
        lp[s] = (x[k] - m) - lz;
    }
}
/* The BLAS sgemm torch.mm calls for fp32 on CPU (MKL's, inside libtorch): Fortran interface,
   column-major, 32-bit sizes. FusedLlama passes its address where it finds one. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);

/* out (R, N) = x (R, K) wt (K, N), row-major: the call torch.mm(x, wt, out=out) makes. */
static void product(sgemm_fn gemm, const float *x, const float *wt, float *out, int64_t R,
                    int64_t K, int64_t N) {
    const char nt = 'N';
    const int m = (int)N, n = (int)R, k = (int)K;
    const float one = 1.0f, zero = 0.0f;
    gemm(&nt, &nt, &m, &n, &k, &one, wt, &m, x, &k, &zero, out, &m);
}

/* product() for Python, to check it against torch.mm (FusedLlama). */
void gemm_rows(const void *gemm, const float *x, const float *wt, float *out, int64_t R,
               int64_t K, int64_t N) {
    product((sgemm_fn)(intptr_t)gemm, x, wt, out, R, K, N);
}

/* y += x over n floats (torch's add_: one rounding per element). */
static void add_into(float *restrict y, const float *restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

void attn_decode(const float *restrict qkv, const float *restrict cos_t,
                 const float *restrict sin_t, const int64_t *restrict pos, kv_t *restrict kc,
                 kv_t *restrict vc, const kv_t *restrict kp, const kv_t *restrict vp,
                 const int64_t *restrict rp, const int64_t *restrict pstart,
                 const int64_t *restrict cr, float *restrict out, float *restrict scratch,
                 int64_t per_thread, int64_t nthreads, int64_t S, int64_t H, int64_t Hkv,
                 int64_t D, int64_t T, int64_t Lp, int64_t t, float scaling);

#define PTR(i) ((void *)(intptr_t)tab[i])

/* One whole decoding step for S slots, the same calls in the same order as FusedLlama.step
   makes them one by one from Python (bit for bit its results), in one call: the embedding
   rows of ids, then per layer RMS norm, q/k/v product, attention (token t, positions pos),
   o product and residual, RMS norm, gate/up product, SiLU gate, down product and residual;
   the final norm, the head's logits and the sampler's choice (sample_rows). Products by gemm
   over transposed (in, out) weights. tab: pointers (FusedLlama._tables's layout); eps: each
   layer's two norm epsilons, the final norm's, then the attention scale; dim: L, C, H, Hkv,
   D, T, Lp, I, V, per_thread, nthreads. */
void decode_step(const int64_t *restrict tab, const float *restrict eps,
                 const int64_t *restrict dim, const int64_t *restrict ids,
                 const int64_t *restrict pos, const float *restrict scale,
                 const uint8_t *restrict greedy, const float *restrict uni, int64_t S,
                 int64_t t) {
    const int64_t L = dim[0], C = dim[1], H = dim[2], Hkv = dim[3], D = dim[4], T = dim[5];
    const int64_t Lp = dim[6], I = dim[7], V = dim[8], per_thread = dim[9], nthreads = dim[10];
    const sgemm_fn gemm = (sgemm_fn)PTR(0);
    const float *embed = PTR(1);
    float *h = PTR(2), *x = PTR(3), *qkv = PTR(4), *o = PTR(5), *y = PTR(6), *gu = PTR(7);
    float *a = PTR(8), *logits = PTR(9), *lp = PTR(11), *scratch = PTR(12);
    int64_t *tok = PTR(10);
    const float *cs = PTR(13), *sn = PTR(14);
    const int64_t *rp = PTR(15), *pstart = PTR(16), *cr = PTR(17);
    for (int64_t s = 0; s < S; s++) memcpy(h + s * C, embed + ids[s] * C, C * sizeof(float));
    for (int64_t l = 0; l < L; l++) {
        const int64_t *w = tab + 20 + 10 * l; /* ln1, qkv, o, ln2, gu, down, kc, vc, kp, vp */
        rmsnorm(h, (const float *)(intptr_t)w[0], x, S, C, eps[2 * l]);
        product(gemm, x, (const float *)(intptr_t)w[1], qkv, S, C, (H + 2 * Hkv) * D);
        attn_decode(qkv, cs, sn, pos, (kv_t *)(intptr_t)w[6], (kv_t *)(intptr_t)w[7],
                    (const kv_t *)(intptr_t)w[8], (const kv_t *)(intptr_t)w[9], rp, pstart, cr,
                    o, scratch, per_thread, nthreads, S, H, Hkv, D, T, Lp, t, eps[2 * L + 1]);
        product(gemm, o, (const float *)(intptr_t)w[2], y, S, H * D, C);
        add_into(h, y, S * C);
        rmsnorm(h, (const float *)(intptr_t)w[3], x, S, C, eps[2 * l + 1]);
        product(gemm, x, (const float *)(intptr_t)w[4], gu, S, C, 2 * I);
        silu_mul(gu, a, S, I, nthreads);
        product(gemm, a, (const float *)(intptr_t)w[5], y, S, I, C);
        add_into(h, y, S * C);
    }
    rmsnorm(h, PTR(18), x, S, C, eps[2 * L]);
    product(gemm, x, PTR(19), logits, S, C, V);
    sample_rows(logits, scale, greedy, uni, tok, lp, scratch, S, V);
}
#undef PTR
"""

_C_TRAIN = r"""
/* The trainer's packed forward and backward. */
/* The LoRA adapters' gradients of one projection y = x (W + s B A)^T in one pass over the
   rows (the trainer's backward, lora_linear.py): x (N, I) its input, g (N, O) the gradient of
   y, a (R, I) = A, bt (R, O) = B^T. Writes ga (R, I) = s (g B)^T x and gbt (R, O) = s (x A^T)^T g
   (= the gradient of B, transposed). Each row's u = A x_n and v = B^T g_n are formed and used
   at once, so x and g are read once each (four matrix products read each twice). Rows are
   split over nthreads in contiguous ranges; each thread sums blocks of 256 rows, then adds
   the block into its total (shorter float sums: a few 1e-7 relative, not 1e-6), in scratch
   (2 nthreads (R I + R O) floats); the threads' totals are added in thread order. */
void lora_grads(const float *restrict x, const float *restrict g, const float *restrict a,
                const float *restrict bt, float *restrict ga, float *restrict gbt,
                float *restrict scratch, int64_t N, int64_t I, int64_t O, int64_t R, float s,
                int64_t nthreads) {
    const int64_t per = R * I + R * O;
    if (nthreads < 1) nthreads = 1;
    memset(scratch, 0, 2 * nthreads * per * sizeof(float)); /* threads that never run: 0 */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        float *total = scratch + t * per, *pa = scratch + (nthreads + t) * per, *pb = pa + R * I;
        const int64_t lo = N * t / nt, hi = N * (t + 1) / nt;
        float u[R], v[R];
        for (int64_t n = lo; n < hi; n++) {
            if ((n - lo) % 256 == 0 && n > lo) { /* block done: into the total */
#pragma omp simd
                for (int64_t j = 0; j < per; j++) {
                    total[j] += pa[j];
                    pa[j] = 0.0f;
                }
            }
            const float *xn = x + n * I, *gn = g + n * O;
            for (int64_t r = 0; r < R; r++) {
                const float *ar = a + r * I, *br = bt + r * O;
                float su = 0.0f, sv = 0.0f;
#pragma omp simd reduction(+ : su)
                for (int64_t i = 0; i < I; i++) su += ar[i] * xn[i];
#pragma omp simd reduction(+ : sv)
                for (int64_t o = 0; o < O; o++) sv += br[o] * gn[o];
                u[r] = su;
                v[r] = sv;
            }
            for (int64_t r = 0; r < R; r++) {
                float *par = pa + r * I, *pbr = pb + r * O;
                const float vr = v[r], ur = u[r];
#pragma omp simd
                for (int64_t i = 0; i < I; i++) par[i] += vr * xn[i];
#pragma omp simd
                for (int64_t o = 0; o < O; o++) pbr[o] += ur * gn[o];
            }
        }
#pragma omp simd
        for (int64_t j = 0; j < per; j++) total[j] += pa[j];
    }
    for (int64_t j = 0; j < per; j++) {
        float acc = 0.0f;
        for (int64_t t = 0; t < nthreads; t++) acc += scratch[t * per + j];
        if (j < R * I)
            ga[j] = s * acc;
        else
            gbt[j - R * I] = s * acc;
    }
}

/* The trainer's RMS norm and SiLU gate, forward and backward (fused_ops.py). Rows are split
   over nthreads in contiguous ranges; each row's arithmetic is the same whatever the split. */

/* y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row: x, y (S, C), w (C,), r (S,). */
void rms_fwd(const float *restrict x, const float *restrict w, float *restrict y,
             float *restrict r, int64_t S, int64_t C, float eps, int64_t nthreads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && S >= 64)
#endif
    for (int64_t s = 0; s < S; s++) {
        r[s] = rms_row(x + s * C, w, y + s * C, C, eps);
    }
}

/* From gy (S, C): gx = r (w gy) - x r^3 / C sum_c(w gy x) per row; if gw is not NULL, gw (C,)
   = sum over rows of gy x r, summed per thread in scratch (nthreads C floats), then in thread
   order. */
void rms_bwd(const float *restrict x, const float *restrict w, const float *restrict r,
             const float *restrict gy, float *restrict gx, float *restrict gw,
             float *restrict scratch, int64_t S, int64_t C, int64_t nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (gw) memset(scratch, 0, nthreads * C * sizeof(float));
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && S >= 64)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        float *part = scratch + t * C;
        for (int64_t s = S * t / nt; s < S * (t + 1) / nt; s++) {
            const float *xs = x + s * C, *gs = gy + s * C, rs = r[s];
            float *o = gx + s * C, dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < C; c++) dot += w[c] * gs[c] * xs[c];
            const float k = dot * rs * rs * rs / (float)C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) o[c] = rs * (w[c] * gs[c]) - xs[c] * k;
            if (gw) {
#pragma omp simd
                for (int64_t c = 0; c < C; c++) part[c] += gs[c] * (xs[c] * rs);
            }
        }
    }
    if (gw)
        for (int64_t c = 0; c < C; c++) {
            float acc = 0.0f;
            for (int64_t t = 0; t < nthreads; t++) acc += scratch[t * C + c];
            gw[c] = acc;
        }
}

/* a = silu(g) * u: g, u, a (n,), n split over nthreads. */
void silu_fwd(const float *restrict g, const float *restrict u, float *restrict a, int64_t n,
              int64_t nthreads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n >= 65536)
#endif
    for (int64_t b = 0; b < n; b += 4096) {
        silu_mul_rows(g + b, u + b, a + b, (b + 4096 < n ? b + 4096 : n) - b);
    }
}

/* From ga (n,): gg = ga u sigma(g) (1 + g (1 - sigma(g))), gu = ga silu(g). */
void silu_bwd(const float *restrict g, const float *restrict u, const float *restrict ga,
              float *restrict gg, float *restrict gu, int64_t n, int64_t nthreads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n >= 65536)
#endif
    for (int64_t b = 0; b < n; b += 4096) {
        const int64_t e = b + 4096 < n ? b + 4096 : n;
        for (int64_t i = b; i < e; i += 16) {
            const int64_t m = e - i;
            const v16 x = loadn(g + i, m), a = loadn(ga + i, m), sg = 1.0f / (1.0f + exp_v(-x));
            storen(gu + i, a * (x * sg), m); /* ga silu(g) */
            storen(gg + i, a * loadn(u + i, m) * (sg * (1.0f + x * (1.0f - sg))), m);
        }
    }
}
"""

_C_STREAM = r"""
/* Attention of the trainer's packed stream (stream_attention.py), RoPE included: segment r
   holds stream rows start .. start+m-1 (seg[3r], seg[3r+1]) of one sequence whose prompt is
   u = seg[3r+2]; its row j attends to that prompt's valid keys (columns pstart[u] .. Lp-1 of
   kp[u], already rotated), then to its own stream keys 0 .. j. q (N, H, D), k and v (N, Hkv, D):
   the stream's queries and keys before RoPE, and values; cos, sin (N, D): each stream row's
   rotary table; kp, vp (U, Hkv, Lp, D): the prompts'. Head h reads kv head h / (H / Hkv).
   Scores are (scale rope(q)) . rope(k). Per thread, scratch holds per_thread >=
   stream_attn_per_thread(L, D) floats, L = np + m the longest segment's keys. */
#define TT 16 /* keys per tile: L1-resident here, so a whole 16-float vector per multiply-add */
#define T16(n) (((n) + TT - 1) / TT * TT)
#define RB 4 /* rows per block of the backward's rank-1 updates */

/* tile_scores for n 16-key tiles (D, 16): eight tiles at a time, so that eight independent
   chains of D multiply-adds keep both FMA units busy (fewer wait on their own chain's latency);
   a last group of fewer tiles recomputes its last tile in the spare chains instead. Each score
   sums over d in the same order as with 8-key tiles, so the results are the same. */
INLINE void tiles16_scores(const float *restrict q, const float *restrict kt,
                           float *restrict out, int64_t n, int64_t D) {
    for (int64_t b = 0; b < n; b += 8) {
        const int64_t nb = n - b < 8 ? n - b : 8;
        const float *k[8];
        for (int64_t i = 0; i < 8; i++) k[i] = kt + (b + (i < nb ? i : nb - 1)) * D * TT;
        v16 a[8] = {{0}};
        for (int64_t d = 0; d < D; d++) {
            const float qd = q[d];
            for (int64_t i = 0; i < 8; i++) {
                v16 x;
                memcpy(&x, k[i] + d * TT, sizeof x);
                a[i] += qd * x;
            }
        }
        for (int64_t i = 0; i < nb; i++) memcpy(out + (b + i) * TT, &a[i], sizeof a[i]);
    }
}

/* The transpose of rope: dx (D,) from the gradient g of rope(x). */
INLINE void rope_t(const float *restrict g, const float *restrict c, const float *restrict sn,
                   float *restrict dx, int64_t D) {
    const int64_t h = D / 2;
#pragma omp simd
    for (int64_t d = 0; d < h; d++) dx[d] = g[d] * c[d] + g[d + h] * sn[d + h];
#pragma omp simd
    for (int64_t d = h; d < D; d++) dx[d] = g[d] * c[d] - g[d - h] * sn[d - h];
}

/* keys 0 .. L-1 of (segment, kv head): the prompt's valid ones, then the stream's (rotated by
   their rows' cos, sin when c is not NULL), into tiles kt (T16(L) / 16, D, 16) (missing lanes 0)
   and, if rows is not NULL, rows (L, D). */
INLINE void sa_gather(const float *restrict kpg, const float *restrict ks, const float *restrict c,
                      const float *restrict sn, int64_t np, int64_t L, int64_t kstride,
                      float *restrict kt, float *restrict rows, int64_t D) {
    if (L % TT) memset(kt + (L / TT) * D * TT, 0, D * TT * sizeof(float));
    float key[D];
    for (int64_t l = 0; l < L; l++) {
        if (l < np)
            memcpy(key, kpg + l * D, D * sizeof(float));
        else if (c)
            rope(ks + (l - np) * kstride, c + (l - np) * D, sn + (l - np) * D, key, D);
        else
            memcpy(key, ks + (l - np) * kstride, D * sizeof(float));
        float *t = kt + (l / TT) * D * TT + l % TT;
        for (int64_t d = 0; d < D; d++) t[d * TT] = key[d];
        if (rows) memcpy(rows + l * D, key, D * sizeof(float));
    }
}
"""

_C_STREAM_FWD = r"""
INLINE void sa_fwd_task(const float *restrict q, const float *restrict k, const float *restrict v,
                        const float *restrict cs, const float *restrict sn,
                        const float *restrict kp, const float *restrict vp,
                        const int64_t *restrict seg, const int64_t *restrict pstart,
                        float *restrict o, float *restrict lse, float *restrict buf, int64_t r,
                        int64_t g, int64_t H, int64_t Hkv, int64_t D, int64_t Lp, float scale) {
    const int64_t start = seg[3 * r], m = seg[3 * r + 1], u = seg[3 * r + 2], rep = H / Hkv;
    const int64_t p0 = pstart[u], np = Lp - p0, L = np + m;
    float *kt = buf, *vr = kt + T16(L) * D, *sc = vr + T16(L) * D, *qs = sc + T16(L) + 2 * TT;
    const int64_t at = (u * Hkv + g) * Lp + p0;
    sa_gather(kp + at * D, k + (start * Hkv + g) * D, cs + start * D, sn + start * D, np, L,
              Hkv * D, kt, NULL, D);
    memcpy(vr, vp + at * D, np * D * sizeof(float));
    for (int64_t j = 0; j < m; j++)
        memcpy(vr + (np + j) * D, v + ((start + j) * Hkv + g) * D, D * sizeof(float));
    for (int64_t hr = 0; hr < rep; hr++) {
        const int64_t h = g * rep + hr;
        for (int64_t j = 0; j < m; j++) {
            const int64_t n = np + j + 1, row = (start + j) * H + h;
            rope(q + row * D, cs + (start + j) * D, sn + (start + j) * D, qs, D);
#pragma omp simd
            for (int64_t d = 0; d < D; d++) qs[d] *= scale;
            tiles16_scores(qs, kt, sc, (n + TT - 1) / TT, D);
            float mx;
            const float z = exp_shifted(sc, n, &mx);
            float acc[D];
            memset(acc, 0, sizeof acc);
            weighted_rows(sc, vr, n, acc, D, NULL);
            const float inv = 1.0f / z;
            float *orow = o + row * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) orow[d] = acc[d] * inv;
            lse[row] = mx + logf(z);
        }
    }
}

/* o (N, H, D) and the log-sum-exp of each row's scores, lse (N, H); rows no segment holds are
   not written. Tasks (segment, kv head) are split over nthreads. */
void stream_attn_fwd(const float *restrict q, const float *restrict k, const float *restrict v,
                     const float *restrict cs, const float *restrict sn,
                     const float *restrict kp, const float *restrict vp,
                     const int64_t *restrict seg, const int64_t *restrict pstart,
                     float *restrict o, float *restrict lse, float *restrict scratch,
                     int64_t per_thread, int64_t nthreads, int64_t R, int64_t H, int64_t Hkv,
                     int64_t D, int64_t Lp, float scale) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
#endif
    for (int64_t t = 0; t < R * Hkv; t++) {
#ifdef _OPENMP
        float *buf = scratch + omp_get_thread_num() * per_thread;
#else
        float *buf = scratch;
#endif
#define TASK(DD)                                                                           \
    sa_fwd_task(q, k, v, cs, sn, kp, vp, seg, pstart, o, lse, buf, t / Hkv, t % Hkv, H, Hkv, \
                DD, Lp, scale)
        if (D == HEAD_DIM)
            TASK(HEAD_DIM);
        else
            TASK(D);
#undef TASK
    }
}
"""

_C_STREAM_BWD = r"""
INLINE void sa_bwd_segment(const float *restrict q, const float *restrict k, const float *restrict v,
                           const float *restrict cs, const float *restrict sn,
                           const float *restrict kp, const float *restrict vp,
                           const float *restrict o, const float *restrict lse,
                           const float *restrict go, float *restrict dq, float *restrict dk,
                           float *restrict dv, float *restrict dkp, float *restrict dvp,
                           float *restrict buf, int64_t start, int64_t m, int64_t u, int64_t p0,
                           int64_t g, int64_t H, int64_t Hkv, int64_t D, int64_t Lp, float scale) {
    const int64_t rep = H / Hkv, np = Lp - p0, L = np + m, PS = T16(L) + 2 * TT;
    /* p, ds: RB rows of PS floats each (a block of rows' probabilities and score gradients);
       qr: their RB rotated queries */
    float *kt = buf, *vt = kt + T16(L) * D, *kr = vt + T16(L) * D, *gk = kr + T16(L) * D,
          *gv = gk + T16(L) * D, *p = gv + T16(L) * D, *ds = p + RB * PS, *qr = ds + RB * PS,
          *qs = qr + RB * D;
    const int64_t at = (u * Hkv + g) * Lp + p0;
    const float *cseg = cs + start * D, *sseg = sn + start * D;
    sa_gather(kp + at * D, k + (start * Hkv + g) * D, cseg, sseg, np, L, Hkv * D, kt, kr, D);
    sa_gather(vp + at * D, v + (start * Hkv + g) * D, NULL, NULL, np, L, Hkv * D, vt, NULL, D);
    memset(gk, 0, 2 * T16(L) * D * sizeof(float)); /* gk, gv */
    for (int64_t hr = 0; hr < rep; hr++) {
        const int64_t h = g * rep + hr;
        for (int64_t j0 = 0; j0 < m; j0 += RB) {
            const int64_t nb = m - j0 < RB ? m - j0 : RB;
            const float *gb[RB];
            for (int64_t b = 0; b < nb; b++) {
                const int64_t j = j0 + b, n = np + j + 1, nt = (n + TT - 1) / TT;
                const int64_t row = (start + j) * H + h;
                const float *gj = go + row * D, *oj = o + row * D;
                float *pb = p + b * PS, *dsb = ds + b * PS, *qrb = qr + b * D;
                gb[b] = gj;
                float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
                for (int64_t d = 0; d < D; d++) delta += gj[d] * oj[d];
                rope(q + row * D, cseg + j * D, sseg + j * D, qrb, D);
#pragma omp simd
                for (int64_t d = 0; d < D; d++) qs[d] = qrb[d] * scale;
                tiles16_scores(qs, kt, pb, nt, D);
                tiles16_scores(gj, vt, dsb, nt, D);
                exp_shift_rows(pb, pb, lse[row], n);
#pragma omp simd
                for (int64_t l = 0; l < n; l++) dsb[l] = pb[l] * (dsb[l] - delta) * scale;
                float acc[D];
                memset(acc, 0, sizeof acc);
                weighted_rows(dsb, kr, n, acc, D, NULL);
                rope_t(acc, cseg + j * D, sseg + j * D, dq + row * D, D);
            }
            /* the block's rank-1 updates gk[l] += ds[l] qr, gv[l] += p[l] go: each key's rows
               are loaded once and take the block's terms in row order, the order in which
               row-by-row updates add them, so the sums are the same. Keys 0 .. n0-1 are every
               row's; the later ones only the later rows'. */
            const int64_t n0 = np + j0 + 1;
            if (nb == RB) {
                const float *q0 = qr, *q1 = qr + D, *q2 = qr + 2 * D, *q3 = qr + 3 * D;
                for (int64_t l = 0; l < n0; l++) {
                    const float d0 = ds[l], d1 = ds[PS + l], d2 = ds[2 * PS + l],
                                d3 = ds[3 * PS + l], e0 = p[l], e1 = p[PS + l],
                                e2 = p[2 * PS + l], e3 = p[3 * PS + l];
                    float *gkl = gk + l * D, *gvl = gv + l * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) {
                        gkl[d] = gkl[d] + d0 * q0[d] + d1 * q1[d] + d2 * q2[d] + d3 * q3[d];
                        gvl[d] = gvl[d] + e0 * gb[0][d] + e1 * gb[1][d] + e2 * gb[2][d] +
                                 e3 * gb[3][d];
                    }
                }
            }
            for (int64_t b = 0; b < nb; b++) {
                const float *dsb = ds + b * PS, *pb = p + b * PS, *qrb = qr + b * D, *gj = gb[b];
                for (int64_t l = nb == RB ? n0 : 0; l < n0 + b; l++) {
                    const float dl = dsb[l], pl = pb[l];
                    float *gkl = gk + l * D, *gvl = gv + l * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) {
                        gkl[d] += dl * qrb[d];
                        gvl[d] += pl * gj[d];
                    }
                }
            }
        }
    }
    for (int64_t l = 0; l < np; l++) {
        float *a = dkp + (at + l) * D, *b = dvp + (at + l) * D;
        const float *x = gk + l * D, *y = gv + l * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            a[d] += x[d];
            b[d] += y[d];
        }
    }
    for (int64_t j = 0; j < m; j++) {
        rope_t(gk + (np + j) * D, cseg + j * D, sseg + j * D, dk + ((start + j) * Hkv + g) * D, D);
        memcpy(dv + ((start + j) * Hkv + g) * D, gv + (np + j) * D, D * sizeof(float));
    }
}

/* Gradients of stream_attn_fwd from go (N, H, D), given its o and lse: dq (N, H, D), dk, dv
   (N, Hkv, D) (of q and k before RoPE), written for the segments' rows; dkp, dvp (U, Hkv, Lp,
   D), added to (the caller zeroes them). order lists the segments prompt by prompt: those of
   prompt u are order[uoff[u] .. uoff[u+1]-1]. Tasks (prompt, kv head) are split over nthreads:
   each task alone adds to its prompt's key gradients, in segment order, so results do not
   depend on the thread count. */
void stream_attn_bwd(const float *restrict q, const float *restrict k, const float *restrict v,
                     const float *restrict cs, const float *restrict sn,
                     const float *restrict kp, const float *restrict vp,
                     const float *restrict o, const float *restrict lse,
                     const float *restrict go, float *restrict dq, float *restrict dk,
                     float *restrict dv, float *restrict dkp, float *restrict dvp,
                     const int64_t *restrict seg, const int64_t *restrict order,
                     const int64_t *restrict uoff, const int64_t *restrict pstart,
                     float *restrict scratch, int64_t per_thread, int64_t nthreads, int64_t U,
                     int64_t H, int64_t Hkv, int64_t D, int64_t Lp, float scale) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
#endif
    for (int64_t t = 0; t < U * Hkv; t++) {
#ifdef _OPENMP
        float *buf = scratch + omp_get_thread_num() * per_thread;
#else
        float *buf = scratch;
#endif
        const int64_t u = t / Hkv, g = t % Hkv;
        for (int64_t i = uoff[u]; i < uoff[u + 1]; i++) {
            const int64_t r = order[i], start = seg[3 * r], m = seg[3 * r + 1];
#define SEG(DD)                                                                                \
    sa_bwd_segment(q, k, v, cs, sn, kp, vp, o, lse, go, dq, dk, dv, dkp, dvp, buf, start, m, u, \
                   pstart[u], g, H, Hkv, DD, Lp, scale)
            if (D == HEAD_DIM)
                SEG(HEAD_DIM);
            else
                SEG(D);
#undef SEG
        }
    }
}

/* Floats of scratch per thread that stream_attn_fwd and stream_attn_bwd need for segments of
   at most L keys (a prompt's valid keys and the segment's own) and heads of D (the backward's
   layout, the larger). */
int64_t stream_attn_per_thread(int64_t L, int64_t D) {
    return 5 * T16(L) * D + 2 * RB * (T16(L) + 2 * TT) + (RB + 2) * D;
}
"""

# Each part's translation units, compiled side by side (``_build``): its largest unit bounds
# the build's wall time instead of the sum of all of them.
_SOURCES = {
    "decode": [_C_HEADER + _C_DECODE_ATTN, _C_HEADER + _C_DECODE],
    "train": [
        _C_HEADER + _C_TRAIN,
        _C_HEADER + _C_STREAM + _C_STREAM_FWD,
        _C_HEADER + _C_STREAM + _C_STREAM_BWD,
    ],
}

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "decode": {
        "rmsnorm": [_P, _P, _P, _I64, _I64, _F32],
        "silu_mul": [_P, _P, _I64, _I64, _I64],
        "attn_decode": [_P] * 13 + [_I64] * 9 + [_F32],
        "sample_rows": [_P] * 7 + [_I64, _I64],
        "decode_step": [_P] * 8 + [_I64, _I64],
        "gemm_rows": [_P] * 4 + [_I64] * 3,
        "attn_decode_per_thread": [_I64] * 5,
        "kv_bytes": [],
        "decode_head_dim": [],
        "key_tile": [],
    },
    "train": {
        "lora_grads": [_P] * 7 + [_I64] * 4 + [_F32, _I64],
        "stream_attn_fwd": [_P] * 12 + [_I64] * 7 + [_F32],
        "stream_attn_bwd": [_P] * 20 + [_I64] * 7 + [_F32],
        "rms_fwd": [_P] * 4 + [_I64, _I64, _F32, _I64],
        "rms_bwd": [_P] * 7 + [_I64] * 3,
        "silu_fwd": [_P] * 3 + [_I64, _I64],
        "silu_bwd": [_P] * 5 + [_I64, _I64],
        "stream_attn_per_thread": [_I64, _I64],
    },
}
# Tried in order: the build machine's vector ISA with OpenMP (attention's slots split over
# torch's threads), without it, then portable code. -fno-trapping-math lets the compiler
# if-convert the clamps in exp_v (torch itself is built with it); no flag changes results, only
# which instructions and threads compute them.
_I64_RESULTS = ("kv_bytes", "decode_head_dim", "key_tile")  # besides the *_per_thread sizes
# -O2 plus loop peeling and unswitching, the two -O3 passes the attention loops gain from: the
# same code speed as -O3 and the same results (bit for bit here), built in about 3/4 the time.
_OPT = ["-O2", "-fpeel-loops", "-funswitch-loops"]
_FLAG_SETS = ([*_OPT, "-march=native", "-fopenmp"], [*_OPT, "-march=native"], _OPT)
# -ffp-contract=fast: a * b + c as one fused multiply-add (rounded once), which -std=c11 leaves
# off; the trainer's attention kernels ran about 20% faster with it (docs/results/performance.md)
_COMMON = [
    "-pipe",  # the compiler's stages through pipes, not temporary files
    "-std=c11",
    "-ffp-contract=fast",
    "-fPIC",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
]

_warned: set[str] = set()
_libs: dict[tuple[str, int, bool], ctypes.CDLL] = {}  # by part, head size and half KV cache
_threaded: set[int] = set()  # ids of the libraries that may split work over torch's threads
_lib_error: str | None = None


def _warn_once(reason: str, what: str = "fused decoding") -> None:
    """One warning line per reason: ``what`` is off, decoding runs eagerly."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{what} off, decoding eagerly: {reason}", RuntimeWarning, 3)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _one_openmp_runtime() -> bool:
    """Whether this process has exactly one OpenMP runtime mapped (Linux), so that the
    kernels' parallel loops run on the thread pool torch's own ops use. With two runtimes each
    pool would spin on the cores the other needs; the kernels then stay on one thread."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    names = re.compile(r"/lib(?:g|i|)omp[^/]*\.so[^/]*$")
    found = {ln.split()[-1] for ln in maps.splitlines() if names.search(ln)}
    return len(found) == 1


def threads(lib: ctypes.CDLL) -> int:
    """Threads the kernels of ``lib`` split their rows over: torch's intra-op count where the
    build has OpenMP sharing torch's runtime, else 1."""
    return torch.get_num_threads() if id(lib) in _threaded else 1


def _build(sources: list[str], cc: str, flags: list[str], out: Path) -> None:
    """Compile the translation units side by side (a compiler process each), then link them
    (without any math flags: linking with -ffast-math would pull in crtfastmath.o, which
    changes the whole process's denormal handling). CalledProcessError or TimeoutExpired (with
    the compiler's stderr) for the first unit that fails."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        units = [(Path(tmp) / f"unit{i}.c", Path(tmp) / f"unit{i}.o") for i in range(len(sources))]
        procs: list[tuple[list[str], subprocess.Popen]] = []
        try:
            for source, (src, obj) in zip(sources, units):
                src.write_text(source)
                cmd = [cc, *_COMMON, *flags, "-c", str(src), "-o", str(obj)]
                procs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
            for cmd, proc in procs:
                _, err = proc.communicate(timeout=120)
                if proc.returncode:
                    raise subprocess.CalledProcessError(proc.returncode, cmd, stderr=err)
        finally:
            for _, proc in procs:  # none left running or unreaped, whatever failed
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        so = Path(tmp) / "fused.so"
        objs = [str(obj) for _, obj in units]
        link = [cc, "-shared", *objs, "-o", str(so), "-lm", *(f for f in flags if "openmp" in f)]
        subprocess.run(link, check=True, capture_output=True, text=True, timeout=120)
        os.replace(so, out)  # atomic: a concurrent build of the same key is harmless


def kernels(head_dim: int = 64, part: str = "decode", kv_half: bool = False) -> ctypes.CDLL:
    """The fused kernels of ``part`` ("decode": the decoding step's; "train": the trainer's),
    specialized for heads of ``head_dim`` (the trainer's still run any other size, on generic
    loops; the decoding step's only that one), built on first use into ``<cache>/kernels/``
    (a fraction of a second to about a second, their translation units side by side), then
    loaded from there.
    ``kv_half``: the decoding step caches keys and values as half floats where the compiler has
    ``_Float16`` (``lib.kv_bytes()`` says which it got). Raises RuntimeError with the reason when
    no C compiler can build them."""
    global _lib_error
    kv_half = kv_half and part == "decode"
    if (part, head_dim, kv_half) in _libs:
        return _libs[part, head_dim, kv_half]
    if _lib_error is not None:
        raise RuntimeError(_lib_error)
    cc = _compiler()
    errors = []
    if cc is None:
        errors.append("no C compiler found (set $CC, or install gcc)")
    else:
        try:
            version = subprocess.run(
                [cc, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            version, cc = "", None
            errors.append(f"C compiler {os.environ.get('CC')!r} does not run ({e})")
        for flags in _FLAG_SETS if cc else ():
            flags = [*flags, f"-DHEAD_DIM={int(head_dim)}", f"-DKV_HALF={int(kv_half)}"]
            key = hashlib.sha256(
                "\0".join(
                    [*_SOURCES[part], cc, version, " ".join(_COMMON + flags), _cpu_id()]
                ).encode()
            ).hexdigest()[:16]
            path = cache_dir() / "kernels" / f"{part}-{key}.so"
            try:
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _build(_SOURCES[part], cc, flags, path)
                lib = ctypes.CDLL(str(path))
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                errors.append(f"{cc} {' '.join(flags)}: {detail.strip().splitlines()[-1:]}")
                continue
            for name, args in _SIGNATURES[part].items():
                getattr(lib, name).argtypes = args
                wide = name.endswith("_per_thread") or name in _I64_RESULTS
                getattr(lib, name).restype = _I64 if wide else None
            if "-fopenmp" in flags and _one_openmp_runtime():
                _threaded.add(id(lib))
            _libs[part, head_dim, kv_half] = lib
            return lib
    _lib_error = "could not build the fused kernels: " + "; ".join(errors)
    raise RuntimeError(_lib_error)


def trainer_kernels() -> ctypes.CDLL:
    """The trainer's kernels already loaded for any head size (for the kernels that do not
    depend on it: norms, gates, adapters), else those for the head size a decoding library was
    loaded for (a rollout's prefill runs the trainer's norms before any training step builds
    them for its attention; one build, not two), else for the default one; RuntimeError as
    ``kernels``."""
    loaded = [lib for (part, _, _), lib in _libs.items() if part == "train"]
    if loaded:
        return loaded[0]
    decoding = [d for (part, d, _) in _libs if part == "decode"]
    return kernels(decoding[0], part="train") if decoding else kernels(part="train")


def _tiles(keys: torch.Tensor, tile: int) -> torch.Tensor:
    """Keys (..., T, D) as (..., ceil(T / tile), D, tile) tiles (the kernel's key layout,
    ``tile`` = its ``key_tile()``), the last tile's missing columns zero."""
    T, D = keys.shape[-2:]
    pad = -T % tile
    if pad:
        keys = torch.cat([keys, keys.new_zeros(*keys.shape[:-2], pad, D)], dim=-2)
    return keys.unflatten(-2, (-1, tile)).transpose(-1, -2).contiguous()


class _Product:
    """y = x w^T + b, one of the decoding step's products: w (out, in) as nn.Linear's, b (out,)
    or None. Where torch's own product runs (oneDNN off: Intel's MKL), w is also kept as
    (in, out) and y is written by ``torch.mm`` into a buffer kept from call to call (so the
    caller must use y before this product's next call), which ran faster than ``F.linear``'s
    (out, in) product into a new tensor (performance.md); elsewhere ``linear`` (one of
    ``onednn``'s) computes it."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.w, self.bias = w.contiguous(), bias
        self.wt = None if onednn.ENABLED else w.t().contiguous()  # (in, out)
        self.out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, linear: Callable[..., torch.Tensor]) -> torch.Tensor:
        """x (R, in) -> y (R, out)."""
        if self.wt is None:
            return linear(x, self.w, self.bias)
        if self.out is None or self.out.shape[0] != x.shape[0]:
            self.out = x.new_empty(x.shape[0], self.wt.shape[1])
        if self.bias is None:
            return torch.mm(x, self.wt, out=self.out)
        return torch.addmm(self.bias, x, self.wt, out=self.out)


_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies independent of length


def shape_unsupported(model: PreTrainedModel, max_len: int) -> str | None:
    """Why no step of fixed layout (this fused one, ``graphs.py``'s) can decode ``model`` up to
    ``max_len`` tokens, or None: not Llama-like, a shorter sliding window, or RoPE frequencies
    that depend on the sequence length."""
    if not decoder.supports(model):
        return f"model type {getattr(model.config, 'model_type', '?')!r} is not Llama-like"
    if not decoder.fits_window(model, max_len):
        return f"sliding-window attention shorter than {max_len} tokens"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in _ROPE_TYPES:
        return f"RoPE type {rope!r} (frequencies must not depend on the sequence length)"
    return None


def unsupported(model: PreTrainedModel, max_len: int) -> str | None:
    """Why the fused step cannot decode ``model`` up to ``max_len`` tokens, or None."""
    if (reason := shape_unsupported(model, max_len)) is not None:
        return reason
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"fp32 on CPU only (got {p.dtype} on {p.device.type})"
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r} (SiLU only)"
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        if any(type(x) is not torch.nn.Linear for x in linears):
            return "projections are not plain nn.Linear (LoRA adapters: merge them first)"
        if any(x.bias is not None for x in linears[3:]):
            return "biases on o_proj or the MLP"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(
            not type(n).__name__.endswith("RMSNorm") or not hasattr(n, "variance_epsilon")
            for n in norms
        ):
            return "norms are not RMSNorm"
    return None


_GEMM: list[int | None] = []  # [address of the sgemm torch.mm calls, or None], once found
_GEMM_AGREES: dict[tuple[int, int, int], bool] = {}  # (R, K, N) -> checked bit for bit


def _gemm_address() -> int | None:
    """The address of the BLAS ``sgemm_`` inside libtorch (MKL's, on x86 builds), or None."""
    if not _GEMM:
        found = None
        try:
            lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
            found = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            pass
        _GEMM.append(found)
    return _GEMM[0]


def _gemm_agrees(lib: ctypes.CDLL, R: int, K: int, N: int) -> bool:
    """Whether ``decode_step``'s products of this shape are torch.mm's bit for bit (they are
    where torch.mm calls that same sgemm, as MKL builds do): checked once per shape on random
    inputs."""
    key = (R, K, N)
    if key not in _GEMM_AGREES:
        g = torch.Generator().manual_seed(R * 7919 + K * 31 + N)
        x, wt = torch.randn(R, K, generator=g), torch.randn(K, N, generator=g)
        ours = torch.empty(R, N)
        lib.gemm_rows(_gemm_address(), x.data_ptr(), wt.data_ptr(), ours.data_ptr(), R, K, N)
        _GEMM_AGREES[key] = torch.equal(ours, torch.mm(x, wt))
    return _GEMM_AGREES[key]


class SpareCaches:
    """Completion caches of finished decodes, kept for the next decode to reuse.

    A fresh cache is tens of MB (a 128-row rollout of the embedded model: 2 x 34 MB), which
    the allocator takes from the OS anew every decode; each page is then faulted in and zeroed
    by the kernel when decoding first writes it. A kept buffer's pages are already there. Its
    old contents are harmless: the fused step reads only cache columns it wrote this decode (and zeroes a key tile when it writes its first column).
    Thread-safe; keeps at most ``limit`` bytes, the most recently returned buffers first."""

    def __init__(self, limit: int = 256 << 20) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []  # 1-d buffers, most recently returned first

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-d buffer of at least ``numel`` elements: the smallest kept one that fits,
        else a new one. Its contents are arbitrary."""
        with self._lock:
            fits = [
                i
                for i, b in enumerate(self._free)
                if b.dtype == dtype and b.device == device and b.numel() >= numel
            ]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, *bufs: torch.Tensor) -> None:
        """Keep ``bufs`` for later decodes, within ``limit`` bytes (older ones go first)."""
        with self._lock:
            kept, total = [], 0
            for b in [*bufs, *self._free]:
                size = b.numel() * b.element_size()
                if total + size <= self.limit:
                    kept.append(b)
                    total += size
            self._free = kept

    def clear(self) -> None:
        with self._lock:
            self._free = []


SPARE = SpareCaches()
"""The fused runners' spare completion caches (``FusedLlama.start`` takes from it)."""


class FusedLlama:
    """The fused decoding runner: ``prefill``, then ``start``, then ``step`` / ``retire``.

    Weights are copied from the model when the runner is built (once per decode), transposed
    to (in, out) and with q/k/v and gate/up concatenated, so that each is one matrix product
    (a few MB: the 0.9M default copies 3.7 MB in about a millisecond).
    """

    def __init__(self, model: PreTrainedModel, lib: ctypes.CDLL, max_len: int) -> None:
        self.model, self.lib = model, lib
        inner, cfg = model.model, model.config
        attn = inner.layers[0].self_attn
        self.D = attn.head_dim
        if lib.decode_head_dim() != self.D:
            raise RuntimeError(f"kernels built for heads of {lib.decode_head_dim()}, not {self.D}")
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scaling = float(attn.scaling)
        self.eps = float(inner.norm.variance_epsilon)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            bias = None
            if a.q_proj.bias is not None:
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight.detach().contiguous(),
                    ln1_eps=float(layer.input_layernorm.variance_epsilon),
                    ln2=layer.post_attention_layernorm.weight.detach().contiguous(),
                    ln2_eps=float(layer.post_attention_layernorm.variance_epsilon),
                    # ((H + 2 Hkv) D, C), as nn.Linear
                    qkv=_Product(qkv.detach(), None if bias is None else bias.detach()),
                    o=_Product(a.o_proj.weight.detach()),
                    gu=_Product(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()),
                    down=_Product(m.down_proj.weight.detach()),
                )
            )
        self.norm = inner.norm.weight.detach().contiguous()
        self.embed = inner.embed_tokens.weight.detach()
        self.lm_head = model.lm_head.weight.detach().contiguous()  # (V, C)
        bias = getattr(model.lm_head, "bias", None)
        self.lm_head_bias = None if bias is None else bias.detach()  # (V,)
        self.head = _Product(self.lm_head, self.lm_head_bias)
        self.I = inner.layers[0].mlp.gate_proj.out_features
        positions = torch.arange(max_len, device=self.embed.device)[None]
        cos, sin = inner.rotary_emb(self.embed[:1][None], positions)  # (1, P, D), HF's own
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.t = 0
        self.S = 0
        # the caches' element type, as the kernels were built (kv_bytes: 2 half, 4 fp32)
        self.kv_dtype = torch.float16 if lib.kv_bytes() == 2 else torch.float32
        self.tile = lib.key_tile()  # key columns per tile of the caches' layout
        # the whole step in one C call (decode_step) where its products are torch's own MKL
        # ones (transposed weights, no biases) and sgemm is found; else a call per kernel
        products = [w[k] for w in self.layers for k in ("qkv", "o", "gu", "down")]
        products.append(self.head)
        self.one_call = all(p.wt is not None and p.bias is None for p in products)
        self.one_call = self.one_call and _gemm_address() is not None
        self.whole: tuple[int, int, int] | None = None  # decode_step's tab, eps, dim pointers

    def prefill(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids, pos, valid: (U, Lp) left-padded prompts; returns last-position logits (U, V)."""
        h, keys, values = decoder.prefill(self.model, ids, pos, valid, self.kv_dtype)
        self.Lp = ids.shape[1]
        kv = self.kv_dtype  # the prefill rounded them to it already: exact conversions
        self.kp = _tiles(torch.stack(keys), self.tile).to(kv)  # (L, U, Hkv, Lp / 8 up, D, 8)
        self.vp = torch.stack(values).to(kv).contiguous()  # (L, U, Hkv, Lp, D)
        # left padding: a prompt's valid columns are a suffix, from its first valid column on
        self.pstart = (valid.shape[1] - valid.sum(-1)).to(torch.int64).contiguous()  # (U,)
        return onednn.linear(self.model.model.norm(h[:, -1]), self.lm_head, self.lm_head_bias)

    forward = prefill

    @property
    def size(self) -> int:
        return self.S

    def start(self, row_prompt: torch.Tensor, max_new: int) -> torch.Tensor:
        """Allocate one completion-cache row per row of prompt ``row_prompt`` (B,); returns
        each row's slot."""
        self.T = max(1, max_new)
        self.t = 0
        rp = row_prompt.to(torch.int64).contiguous()
        L, B, Hkv, D = len(self.layers), len(rp), self.Hkv, self.D
        # never zero-filled: the kernel reads only columns it wrote (a key tile is zeroed
        # when its first column is written), so memory is touched only as rows decode, and a
        # finished decode's buffers can be reused as they are (SPARE)
        tiles = -(-self.T // self.tile)
        shapes = (L, B, Hkv, tiles, D, self.tile), (L, B, Hkv, self.T, D)
        bufs = [SPARE.take(math.prod(s), self.kv_dtype, rp.device) for s in shapes]
        self.k, self.v = (b[: math.prod(s)].view(s) for b, s in zip(bufs, shapes))
        weakref.finalize(self, SPARE.give, *bufs)  # back when this runner is gone
        self._allocate(rp, torch.arange(B, device=rp.device))
        return torch.arange(self.S, device=row_prompt.device)

    def _allocate(self, rp: torch.Tensor, cr: torch.Tensor) -> None:
        """Buffers for ``len(rp)`` live slots; slot s reads prompt rp[s] and owns cache row
        cr[s]."""
        S = len(rp)
        self.rp, self.cr, self.S = rp, cr.contiguous(), S
        C, V = self.embed.shape[1], self.embed.shape[0]
        new = dict(dtype=torch.float32, device=rp.device)
        # the products' inputs, rows rounded up where oneDNN takes them (one kernel per 16
        # slots; fewer than MIN_ROWS go to torch as they are): the kernels write the first S
        # rows, the rest stay 0 and their outputs are dropped
        R = S if S < onednn.MIN_ROWS else onednn.padded_rows(S, 16)
        self.x = torch.zeros(R, C, **new)
        self.o = torch.zeros(R, self.H * self.D, **new)
        self.a = torch.zeros(R, self.I, **new)
        self.tok = torch.empty(S, dtype=torch.int64, device=rp.device)
        self.lp = torch.empty(S, **new)
        self.threads = threads(self.lib)
        self.per_thread = self.lib.attn_decode_per_thread(self.H, self.Hkv, self.D, self.Lp, self.T)
        self.scratch = torch.empty(max(self.threads * self.per_thread, 2 * V), **new)
        # the step's products, decided once per size: where oneDNN applies and R <= BLOCK,
        # onednn.linear would call its product as is, so it is called without the checks on
        # every call; otherwise onednn.linear decides (blocks, or torch's own product)
        direct = onednn.applies(self.x, self.lm_head) and R <= onednn.BLOCK
        self.linear = onednn.product if direct else onednn.linear
        self.whole = self._tables(S, C, V) if self.one_call and R == S else None

    def _tables(self, S: int, C: int, V: int) -> tuple[int, int, int] | None:
        """decode_step's pointer table (kept buffers for S slots), epsilons and sizes, or None
        where one of its products would not be torch.mm's bit for bit."""
        QKV, HD, inter = (self.H + 2 * self.Hkv) * self.D, self.H * self.D, self.I
        shapes = [(C, QKV), (HD, C), (C, 2 * inter), (inter, C), (C, V)]
        if not all(_gemm_agrees(self.lib, S, k, n) for k, n in shapes):
            return None
        new = dict(dtype=torch.float32, device=self.x.device)
        self.h = torch.empty(S, C, **new)
        self.qkv, self.y = torch.empty(S, QKV, **new), torch.empty(S, C, **new)
        self.gu, self.logits = torch.empty(S, 2 * inter, **new), torch.empty(S, V, **new)
        bufs = [self.embed, self.h, self.x, self.qkv, self.o, self.y, self.gu, self.a]
        bufs += [self.logits, self.tok, self.lp, self.scratch, self.cos, self.sin, self.rp]
        bufs += [self.pstart, self.cr, self.norm, self.head.wt]
        tab = [_gemm_address()] + [t.data_ptr() for t in bufs]
        eps = []
        for li, w in enumerate(self.layers):
            ts = [w["ln1"], w["qkv"].wt, w["o"].wt, w["ln2"], w["gu"].wt, w["down"].wt]
            ts += [self.k[li], self.v[li], self.kp[li], self.vp[li]]
            tab += [t.data_ptr() for t in ts]
            eps += [w["ln1_eps"], w["ln2_eps"]]
        dims = [len(self.layers), C, self.H, self.Hkv, self.D, self.T, self.Lp, inter, V]
        dims += [self.per_thread, self.threads]
        # kept on self: the C side reads them through these pointers every step
        self._tab = torch.tensor(tab, dtype=torch.int64)
        self._eps = torch.tensor([*eps, self.eps, self.scaling], dtype=torch.float32)
        self._dim = torch.tensor(dims, dtype=torch.int64)
        return self._tab.data_ptr(), self._eps.data_ptr(), self._dim.data_ptr()

    def retire(self, slot: torch.Tensor) -> torch.Tensor | None:
        """Only the rows at ``slot`` (n,) go on. Compacts the slots when at most 3/4 of them
        are live and returns the new slots; otherwise None (finished rows ride along). The cache
        itself is not copied: a live slot keeps its cache row (``cr``)."""
        n = len(slot)
        if n > 0.75 * self.S:
            return None
        self._allocate(self.rp[slot].contiguous(), self.cr[slot])
        return torch.arange(n, device=slot.device)

    def step(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        scale: torch.Tensor,
        greedy: torch.Tensor,
        uniform: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, pos (S,) int64: one token per slot; scale (S,) float32 (1 for greedy rows),
        greedy (S,) uint8, uniform (S,) float32. Returns logits (S, V) and the chosen token
        and its log-prob (S,) per slot (the buffers are reused by the next step)."""
        lib, S, C, linear = self.lib, self.S, self.embed.shape[1], self.linear
        if self.whole is not None:  # the same calls in one (decode_step)
            # held in locals: a copy made by contiguous() must outlive the call
            args = [t.contiguous() for t in (ids, pos, scale, greedy, uniform)]
            lib.decode_step(*self.whole, *(t.data_ptr() for t in args), S, self.t)
            self.t += 1
            return self.logits, self.tok, self.lp
        x, o, a = self.x, self.o, self.a
        h = self.embed.index_select(0, ids)  # (S, C)
        pos = pos.contiguous()
        Lp = self.Lp
        for li, w in enumerate(self.layers):
            lib.rmsnorm(h.data_ptr(), w["ln1"].data_ptr(), x.data_ptr(), S, C, w["ln1_eps"])
            qkv = w["qkv"](x, linear)  # (R, (H + 2 Hkv) D), rows S.. unread
            lib.attn_decode(
                qkv.data_ptr(),
                self.cos.data_ptr(),
                self.sin.data_ptr(),
                pos.data_ptr(),
                self.k[li].data_ptr(),
                self.v[li].data_ptr(),
                self.kp[li].data_ptr(),
                self.vp[li].data_ptr(),
                self.rp.data_ptr(),
                self.pstart.data_ptr(),
                self.cr.data_ptr(),
                o.data_ptr(),
                self.scratch.data_ptr(),
                self.per_thread,
                self.threads,
                S,
                self.H,
                self.Hkv,
                self.D,
                self.T,
                Lp,
                self.t,
                self.scaling,
            )
            h.add_(w["o"](o, linear)[:S])
            lib.rmsnorm(h.data_ptr(), w["ln2"].data_ptr(), x.data_ptr(), S, C, w["ln2_eps"])
            gu = w["gu"](x, linear)  # (S, 2 I)
            lib.silu_mul(gu.data_ptr(), a.data_ptr(), S, self.I, self.threads)
            h.add_(w["down"](a, linear)[:S])
        lib.rmsnorm(h.data_ptr(), self.norm.data_ptr(), x.data_ptr(), S, C, self.eps)
        self.logits = self.head(x, linear)[:S]  # (S, V)
        V = self.logits.shape[1]
        scale, greedy, uniform = scale.contiguous(), greedy.contiguous(), uniform.contiguous()
        lib.sample_rows(
            self.logits.data_ptr(),
            scale.data_ptr(),
            greedy.data_ptr(),
            uniform.data_ptr(),
            self.tok.data_ptr(),
            self.lp.data_ptr(),
            self.scratch.data_ptr(),
            S,
            V,
        )
        self.t += 1
        return self.logits, self.tok, self.lp


def fused_runner(
    model: PreTrainedModel, max_len: int, kv_cache: str = "model"
) -> FusedLlama | None:
    """A fused runner for ``model`` (sequences up to ``max_len`` tokens) whose key/value cache
    holds ``kv_cache`` floats (``decoder.KV_CACHE``: model, fp32; float16, half floats), or
    None after one warning line when the fused step cannot run here."""
    half = decoder.kv_cache_dtype(kv_cache, torch.float32) == torch.float16
    reason = unsupported(model, max_len)
    if reason is None:
        try:
            lib = kernels(model.model.layers[0].self_attn.head_dim, kv_half=half)
            return FusedLlama(model, lib, max_len)
        except RuntimeError as e:
            reason = str(e)
    _warn_once(reason)
    return None


def lora_grads(
    x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gradients of LoRA's A (R, I) and B (O, R) for input rows x (N, I) and output
    gradients g (N, O), by the one-pass kernel (``lora_grads`` in the C source); None where it
    cannot run (not fp32 CPU, or no kernels: the caller takes matrix products instead)."""
    tensors = (x, g, a, b)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    try:
        lib = trainer_kernels()
    except RuntimeError:
        return None
    x, g, a = x.contiguous(), g.contiguous(), a.contiguous()
    bt = b.t().contiguous()  # (R, O)
    (n, c_in), c_out, r = x.shape, g.shape[1], a.shape[0]
    n_threads = threads(lib)
    ga, gbt = x.new_empty(r, c_in), x.new_empty(r, c_out)
    scratch = x.new_empty(2 * n_threads * r * (c_in + c_out))
    lib.lora_grads(
        x.data_ptr(), g.data_ptr(), a.data_ptr(), bt.data_ptr(), ga.data_ptr(), gbt.data_ptr(),
        scratch.data_ptr(), n, c_in, c_out, r, scale, n_threads,
    )  # fmt: skip
    return ga, gbt.t()
