// Keeps the extension loadable on glibc 2.28 (manylinux_2_28, the tag torch's own wheels use)
// when it is built on a newer glibc. Force-included into every translation unit by CMake.
//
// * exp and log gained new symbol versions in glibc 2.29 (faster code, no SVID error handling);
//   binding the two to their original x86-64 versions costs nothing measurable here: the kernels'
//   hot loops call libmvec's vector variants (GLIBC_2.22) and float expf/logf (GLIBC_2.27).
// * libstdc++'s headers (GCC >= 11 on glibc >= 2.32) read glibc's __libc_single_threaded to skip
//   atomic reference counting in single-threaded programs. bindings.cpp defines a hidden copy
//   that is always 0 ("not single-threaded"): atomics always, which is always correct.
#pragma once
#if defined(__linux__) && __has_include(<features.h>)
#include <features.h>  // defines __GLIBC__ (this header is included before anything else)
#endif
#if defined(__x86_64__) && defined(__GLIBC__)
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
#endif
