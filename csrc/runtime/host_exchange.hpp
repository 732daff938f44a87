// HostExchange: an all-gather of small fixed-size records among the processes of one host, through a
// POSIX shared-memory object, in microseconds (the bootstrap Group takes milliseconds). The pull
// combine exchanges its inputs' addresses through it on every call.
//
// Protocol: rank r owns slot r = {round, record[2]}. all_gather number n writes record[n % 2], then
// publishes round = n (release); a reader waits for every slot's round >= n (acquire) and reads
// record[n % 2]. Two records suffice: a rank can publish n + 1 only after every rank published n, and
// it writes record[(n + 1) % 2], which nobody still reads; to write record[n % 2] again it must have
// seen every rank at n + 1, i.e. past their reads of round n.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "deep_ep/group.hpp"

namespace deep_ep {

// Maps one POSIX shared-memory object of `bytes` zero-filled bytes on every rank of `group` (collective; the
// name is unlinked once all have mapped it), or returns null on every rank when some rank cannot.
void* map_shared_object(Group& group, size_t bytes);
void unmap_shared_object(void* base, size_t bytes);

class HostExchange {
 public:
  // Collective over `group`: rank 0 creates the object, every rank maps it, and it is unlinked once
  // all have (nothing is left in /dev/shm, whatever happens later). Returns null on every rank when
  // some rank cannot map it (ranks on other hosts, no /dev/shm): the caller then does without.
  static std::unique_ptr<HostExchange> create(Group& group, size_t record_bytes, double timeout_s);
  ~HostExchange();
  HostExchange(const HostExchange&) = delete;
  HostExchange& operator=(const HostExchange&) = delete;

  // Every rank passes record_bytes bytes; `all_records` (size() * record_bytes bytes, the caller's, so
  // that a call allocates nothing) receives every rank's in rank order. Raises TimeoutError
  // naming this rank, the missing peer and `phase` when a peer does not arrive within timeout_s; the
  // rounds are out of step after that, so every later call raises too.
  void all_gather(const void* record, void* all_records, const char* phase);

  size_t record_bytes() const { return record_bytes_; }
  int size() const { return size_; }

 private:
  HostExchange(int rank, int size, size_t record_bytes, double timeout_s, void* base, size_t mapped_bytes);
  char* slot(int rank) const;

  int rank_, size_;
  size_t record_bytes_, slot_bytes_;
  double timeout_s_;
  uint64_t round_ = 0;
  bool broken_ = false;  // a wait timed out
  void* base_;
  size_t mapped_bytes_;
};

}  // namespace deep_ep
