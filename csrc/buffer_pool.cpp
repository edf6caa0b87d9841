#include "buffer_pool.h"

#include <pthread.h>
#include <sys/mman.h>

#include <new>
#include <stdexcept>
#include <string>

namespace vae_fast {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;

size_t round_up(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }
}  // namespace

BufferPool& BufferPool::instance() {
  static BufferPool* pool = [] {
    auto* created = new BufferPool();  // intentionally leaked (see the header)
    pthread_atfork(nullptr, nullptr, [] { BufferPool::instance().reset_after_fork(); });
    return created;
  }();
  return *pool;
}

void BufferPool::reset_after_fork() { new (&mutex_) std::mutex(); }

void* BufferPool::acquire(size_t bytes, size_t* capacity) {
  const size_t size = round_up(bytes == 0 ? 1 : bytes);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_buffers_.find(size);
    if (it != free_buffers_.end()) {
      void* ptr = it->second;
      free_buffers_.erase(it);
      cached_ -= size;
      *capacity = size;
      return ptr;
    }
  }
  void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(ptr, size, MADV_HUGEPAGE);  // advisory: fewer first-touch faults where THP is available
#endif
  *capacity = size;
  return ptr;
}

void BufferPool::release(void* ptr, size_t capacity) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_ + capacity <= limit_) {
      free_buffers_.emplace(capacity, ptr);
      cached_ += capacity;
      return;
    }
  }
  munmap(ptr, capacity);
}

size_t BufferPool::cached_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_;
}

size_t BufferPool::limit() {
  std::lock_guard<std::mutex> lock(mutex_);
  return limit_;
}

void BufferPool::set_limit(size_t limit) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit;
  }
  trim();
}

void BufferPool::trim() {
  std::multimap<size_t, void*> freed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    freed.swap(free_buffers_);
    cached_ = 0;
  }
  for (auto& [size, ptr] : freed) munmap(ptr, size);
}

namespace {

// Everything one pooled tensor owns, freed together by the deleter.
struct PooledTensor {
  DLManagedTensor managed;
  int64_t shape[8];
  size_t capacity;
};

void delete_pooled_tensor(DLManagedTensor* self) {
  auto* owner = static_cast<PooledTensor*>(self->manager_ctx);
  BufferPool::instance().release(self->dl_tensor.data, owner->capacity);
  delete owner;
}

}  // namespace

DLManagedTensor* pooled_dlpack_tensor(int dtype, const int64_t* shape, int32_t ndim) {
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("vae_fast._C: dtype code must be 0 or 1");
  if (ndim < 0 || ndim > 8) throw std::invalid_argument("vae_fast._C: pooled tensors have at most 8 dims");
  auto* owner = new PooledTensor();
  size_t numel = 1;
  for (int32_t i = 0; i < ndim; ++i) {
    if (shape[i] < 0) {
      delete owner;
      throw std::invalid_argument("vae_fast._C: negative size " + std::to_string(shape[i]));
    }
    owner->shape[i] = shape[i];
    numel *= size_t(shape[i]);
  }
  const size_t item = dtype == 0 ? 4 : 8;
  void* data;
  try {
    data = BufferPool::instance().acquire(numel * item, &owner->capacity);
  } catch (...) {
    delete owner;
    throw;
  }
  DLTensor& t = owner->managed.dl_tensor;
  t.data = data;
  t.device = DLDevice{1, 0};
  t.ndim = ndim;
  t.dtype = DLDataType{2, uint8_t(item * 8), 1};
  t.shape = owner->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  owner->managed.manager_ctx = owner;
  owner->managed.deleter = delete_pooled_tensor;
  return &owner->managed;
}

}  // namespace vae_fast
