// InlineGate: lets a blocking caller run its own request on its own thread
// (an inline call) while the server is idle, and keeps the server out
// until it is done.
//
// With one actor, a request served by the server thread costs two
// cross-thread wake-ups (the server's, then the caller's) and a GIL
// hand-off each way: on the 2-core VM ~130 µs of a ~320 µs call. When the
// server would serve the request alone anyway (it waits on an empty queue,
// holds nothing, and no other caller is active), the caller may serve it
// itself: the same batch of one, the same model, on the caller's thread.
//
// States, counted over the servers of one queue:
//
//   busy      a server outside its idle wait (serving, or about to)
//   idle      a server waiting for work on an empty queue, holding nothing
//             (no prefetch in flight, nothing carried)
//   borrowed  a caller is running its request inline
//
// A caller may borrow only when no server is busy, at least one is idle and
// no other caller borrowed. A server leaving its idle wait (work arrived,
// or the queue closed) waits until the borrow ends before it may serve.
// So the model, the staging buffers and the statistics are used by one
// side at a time, and a server that attaches late is busy until its first
// idle wait. Every server must attach (the bindings' WorkerLoop does): a
// collector that never attached makes `busy` negative after its first idle
// wait, which keeps callers out only while it is the queue's one server;
// beside an attached one it would let a caller borrow while it serves.
//
// A caller that submitted its request (a future) borrows the same way when
// it waits for the result, and claims its request in the queue
// (Completion::claim) before the server takes it.
//
// All transitions take one mutex: the server's happen once per idle wait,
// the caller's try_borrow never blocks (try_lock).
#pragma once

#include <condition_variable>
#include <mutex>

namespace batchserve {

class InlineGate {
 public:
  // A server starts serving (before its first collection) / stops.
  void attach_server() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++busy_;
  }
  void detach_server() {
    std::lock_guard<std::mutex> lock(mutex_);
    --busy_;
  }

  // Server: about to wait on an empty queue, holding nothing.
  void server_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    --busy_;
    ++idle_;
  }

  // Server: leaves its idle wait; returns once no caller is inline.
  void server_wake() {
    std::unique_lock<std::mutex> lock(mutex_);
    --idle_;
    ++busy_;
    ended_.wait(lock, [this] { return !borrowed_; });
  }

  // Caller: true if it may run its request inline (then end_borrow() once
  // done). Never blocks.
  bool try_borrow() {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock() || borrowed_ || busy_ != 0 || idle_ <= 0) return false;
    borrowed_ = true;
    return true;
  }

  void end_borrow() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      borrowed_ = false;
    }
    ended_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable ended_;
  int busy_ = 0;
  int idle_ = 0;
  bool borrowed_ = false;
};

}  // namespace batchserve
