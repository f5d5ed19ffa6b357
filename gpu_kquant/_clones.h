/*
 * CPU_CLONES builds a hot function twice on x86-64 with glibc and GCC (the compiler it was checked
 * with), for AVX2 and for the baseline, and the loader picks one for the CPU (an ifunc); elsewhere it
 * builds once. INLINE forces a helper into each clone (a helper left out of line would run the
 * baseline code). The kernels compile with -ffp-contract=off and without -ffast-math, so the vector
 * code neither fuses nor reassociates: both clones compute the same floats.
 */
#ifndef GPU_KQUANT_CLONES_H
#define GPU_KQUANT_CLONES_H

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CPU_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef CPU_CLONES
#define CPU_CLONES
#endif

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

#endif
