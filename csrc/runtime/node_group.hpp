// The ranks of one node (consecutive ranks, Topology::rank_of) as a Group of their own, over the parent group's
// collectives: every rank of the parent still calls each collective, and sees only its own node's contributions.
// For collective set-up over a node (InputExports for the internode combine in place); it lives only as long as
// that set-up.
#pragma once

#include <string>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"

namespace deep_ep {

class NodeGroup : public Group {
 public:
  NodeGroup(Group& parent, int num_ranks_per_node)
      : parent_(parent), num_ranks_per_node_(num_ranks_per_node), node_(parent.rank() / num_ranks_per_node) {
    DEEP_EP_CHECK(num_ranks_per_node > 0 && parent.size() % num_ranks_per_node == 0,
                  "NodeGroup: num_ranks_per_node must divide the group size ", parent.size(), ", got ",
                  num_ranks_per_node);
  }
  int rank() const override { return parent_.rank() % num_ranks_per_node_; }
  int size() const override { return num_ranks_per_node_; }
  std::vector<std::string> all_gather(const std::string& bytes) override {
    std::vector<std::string> all = parent_.all_gather(bytes);
    const auto first = all.begin() + static_cast<std::ptrdiff_t>(node_) * num_ranks_per_node_;
    return std::vector<std::string>(first, first + num_ranks_per_node_);
  }
  void barrier() override { parent_.barrier(); }

 private:
  Group& parent_;
  int num_ranks_per_node_, node_;
};

}  // namespace deep_ep
