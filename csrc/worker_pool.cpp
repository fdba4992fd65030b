// WorkerPool: the threads that grade a batch (see worker_pool.hpp).
#include "medvl/worker_pool.hpp"

#include <algorithm>
#include <system_error>

namespace medvl {

WorkerPool::WorkerPool(unsigned threads) {
  workers_.reserve(threads > 1 ? threads - 1 : 0);
  for (unsigned t = 1; t < threads; ++t) {
    try {
      workers_.emplace_back([this] { work(); });
    } catch (const std::system_error&) {
      break;  // the system refused a thread: the ones started and the caller share the work
    }
  }
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  start_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void WorkerPool::start(std::size_t n, const std::function<void(std::size_t)>& fn) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &fn;
    n_ = n;
    // ~16 chunks per thread: long rows do not leave one thread behind, and the shared counter is hit
    // at most once per chunk.
    chunk_ = std::clamp<std::size_t>(n / (std::size_t{size()} * 16), 1, 256);
    next_.store(0);
    error_ = nullptr;
    if (workers_.empty() || n < 2) return;  // wait() runs it inline: waking a thread costs more
    busy_ = static_cast<unsigned>(workers_.size());
    ++generation_;
  }
  start_.notify_all();
}

void WorkerPool::wait() {
  drain();
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this] { return busy_ == 0; });
  job_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

void WorkerPool::drain() {
  try {
    for (;;) {
      const std::size_t begin = next_.fetch_add(chunk_);
      if (begin >= n_) return;
      const std::size_t end = std::min(n_, begin + chunk_);
      for (std::size_t i = begin; i < end; ++i) (*job_)(i);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = std::current_exception();
    next_.store(n_);
  }
}

void WorkerPool::work() {
  unsigned seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    drain();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --busy_;
    }
    done_.notify_one();
  }
}

}  // namespace medvl
