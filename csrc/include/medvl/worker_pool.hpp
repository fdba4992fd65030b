// A fixed set of std::threads for one batch call: run(n, fn) hands out fn(0..n-1) in chunks to the
// workers and the calling thread, and returns when all are done (rethrowing the first exception).
// start(n, fn) + wait() is the same run split in two, so that the caller can do other work (with the
// GIL held) while the workers begin; wait() has the caller take its share of what is left.
// One pool serves every step of a call, so a batch cut into hundreds of steps starts its threads once.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace medvl {

class WorkerPool {
 public:
  // threads counts the calling thread: WorkerPool(1) starts none and runs everything inline.
  explicit WorkerPool(unsigned threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  unsigned size() const { return static_cast<unsigned>(workers_.size()) + 1; }
  void run(std::size_t n, const std::function<void(std::size_t)>& fn) {
    start(n, fn);
    wait();
  }
  // fn must stay alive until wait() returns; without workers, wait() runs all of it inline.
  void start(std::size_t n, const std::function<void(std::size_t)>& fn);
  void wait();

 private:
  void drain();
  void work();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_;
  std::condition_variable done_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::size_t n_ = 0;
  std::size_t chunk_ = 1;
  std::atomic<std::size_t> next_{0};
  unsigned generation_ = 0;
  unsigned busy_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace medvl
