// Bootstrap group (docs/design.md decision 2): the four collectives deep_ep needs from its host.
// Adapters: torch.distributed and mpi4py (Python, through CallbackGroup in the binding), and
// FileGroup below for C++ users and C++ GPU tests.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace deep_ep {

class Group {
 public:
  virtual ~Group() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every rank contributes `bytes` (any length); all ranks get all contributions in rank order.
  virtual std::vector<std::string> all_gather(const std::string& bytes) = 0;
  virtual void barrier() = 0;
};

// A group over a shared directory: rank r writes `<dir>/<round>.<r>` atomically (write then rename)
// and reads the others' files of the same round. Each wait is bounded by timeout_s.
class FileGroup : public Group {
 public:
  FileGroup(std::string dir, int rank, int size, double timeout_s = 120.0);
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::vector<std::string> all_gather(const std::string& bytes) override;
  void barrier() override;

 private:
  std::string dir_;
  int rank_, size_;
  double timeout_s_;
  long round_ = 0;
};

}  // namespace deep_ep
