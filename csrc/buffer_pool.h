// A cache of large host buffers for the CPU kernels' outputs, handed to PyTorch as DLPack
// tensors (a stable C ABI: no libtorch link).
//
// Why: a fresh multi-megabyte buffer costs a page fault per page on first touch, and glibc
// maps every allocation above 32 MiB afresh (and unmaps it on free), so each training step
// paid for zeroing and faulting its 48 MiB likelihood gradient again — as long as the kernel
// itself, and with transparent-huge-page compaction stalls, up to 10x longer. Buffers from
// this pool are mapped once (with MADV_HUGEPAGE) and come back to the pool when torch frees
// the tensor (the DLPack deleter), so the next step reuses memory that is already resident.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

namespace vae_fast {

// DLPack v0.x structures (dlpack.h, Apache-2.0): the legacy "dltensor" capsule every
// torch >= 1.10 accepts.
struct DLDevice {
  int32_t device_type;  // 1 = CPU
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 2 = float
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// Thread-safe; lives until process exit (never destroyed, so deleters that run during
// interpreter shutdown still find it).
class BufferPool {
 public:
  static BufferPool& instance();
  // A buffer of at least `bytes` (rounded up to 2 MiB), reused if one of that size is free.
  void* acquire(size_t bytes, size_t* capacity);
  void release(void* ptr, size_t capacity);
  // Free buffers kept for reuse, in bytes; beyond `limit` released buffers are unmapped.
  size_t cached_bytes();
  size_t limit();
  void set_limit(size_t limit);
  void trim();  // unmap every free buffer
  // In a child after fork(): the mutex may have been held by a parent thread that does not
  // exist here; start over with a fresh one (the cached buffers were copied and stay usable).
  void reset_after_fork();

 private:
  BufferPool() = default;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_buffers_;  // capacity -> address
  size_t cached_ = 0;
  size_t limit_ = size_t(1) << 30;  // 1 GiB of free buffers kept at most
};

// A DLManagedTensor over a pooled buffer holding `numel` elements of float32 (dtype 0) or
// float64 (dtype 1) in the given row-major shape; its deleter returns the buffer to the pool.
DLManagedTensor* pooled_dlpack_tensor(int dtype, const int64_t* shape, int32_t ndim);

}  // namespace vae_fast
