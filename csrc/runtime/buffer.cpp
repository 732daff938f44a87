// Buffer bootstrap and teardown: allocate this rank's communication memory, exchange handles over the
// Group, open the peers' memory, learn which ranks share this GPU (docs/design.md decisions 2, 3 and 5).
#include "deep_ep/buffer.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "deep_ep/error.hpp"
#include "runtime/buffer_internals.hpp"
#include "runtime/env_switches.hpp"
#include "runtime/ipc_allocation.hpp"
#include "runtime/node_group.hpp"
#include "util/cuda_check.hpp"

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
#include "runtime/nccl_comm.hpp"
#include "runtime/transport_launch.hpp"
#endif

namespace deep_ep {

namespace {

// What each rank tells the others at bootstrap. Fixed-size and trivially copyable: it travels as bytes.
struct PeerInfo {
  int pid;
  int device_sms;
  char hostname[64];
  unsigned char device_uuid[16];
  int use_fabric;
  cudaIpcMemHandle_t ipc_handle;
  cudaMemFabricHandle_t fabric_pool_handle;
  cudaMemPoolPtrExportData fabric_ptr;
  uint64_t base_ptr;
  int64_t num_nvl_bytes, num_rdma_bytes;
  int low_latency_mode;
  int ranks_per_node_override;  // DEEP_EP_RANKS_PER_NODE as this rank read it (0 = unset)
  int force_nccl_window;        // DEEP_EP_FORCE_NCCL_WINDOW as this rank read it
  int internode_in_place;       // 0 where this rank read DEEP_EP_INTERNODE_IN_PLACE=0, else 1
  int internode_own_node_push;  // OwnNodePush as this rank read DEEP_EP_INTERNODE_OWN_NODE_PUSH
  int tensors_exportable;       // 1 where CUDA IPC exports this rank's allocator probe (BufferOptions), else 0
  int64_t l2_bytes;             // the device's L2 (dispatch ring sizes, from the group's smallest)
};

int64_t default_timeout_ns(double timeout_s) {
  if (timeout_s <= 0) {
    const char* env = std::getenv("DEEP_EP_TIMEOUT_S");
    timeout_s = env ? std::atof(env) : 60.0;
    if (timeout_s <= 0) timeout_s = 60.0;
  }
  return static_cast<int64_t>(timeout_s * 1e9);
}

// Every rank's bootstrap record, in rank order.
std::vector<PeerInfo> gather_peer_infos(Group& group, const PeerInfo& mine, int num_ranks) {
  const auto gathered = group.all_gather(std::string(reinterpret_cast<const char*>(&mine), sizeof(mine)));
  DEEP_EP_RUNTIME_CHECK(static_cast<int>(gathered.size()) == num_ranks, "group all_gather returned ", gathered.size(),
                        " entries for ", num_ranks, " ranks");
  std::vector<PeerInfo> peers(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    DEEP_EP_RUNTIME_CHECK(gathered[r].size() == sizeof(PeerInfo), "bootstrap record of rank ", r, " has ",
                          gathered[r].size(), " bytes, expected ", sizeof(PeerInfo));
    std::memcpy(&peers[r], gathered[r].data(), sizeof(PeerInfo));
  }
  return peers;
}

std::vector<RankLocation> locations_of(const std::vector<PeerInfo>& peers) {
  std::vector<RankLocation> locations(peers.size());
  for (size_t r = 0; r < peers.size(); ++r) {
    locations[r].hostname.assign(peers[r].hostname, strnlen(peers[r].hostname, sizeof(peers[r].hostname)));
    std::memcpy(locations[r].device_uuid.data(), peers[r].device_uuid, sizeof(peers[r].device_uuid));
  }
  return locations;
}

bool fabric_supported(int device) {
  int handle_types = 0;
  if (cudaDeviceGetAttribute(&handle_types, cudaDevAttrMemoryPoolSupportedHandleTypes, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return (handle_types & cudaMemHandleTypeFabric) != 0;
}

// ---- the phases of Buffer::Buffer, in order ---------------------------------------------------------------

// What this rank tells the others about itself and its device (memory handles are filled in later).
PeerInfo describe_self(const BufferOptions& options, const cudaDeviceProp& prop) {
  PeerInfo mine{};
  mine.pid = static_cast<int>(getpid());
  mine.device_sms = prop.multiProcessorCount;
  mine.l2_bytes = prop.l2CacheSize;
  gethostname(mine.hostname, sizeof(mine.hostname) - 1);
  std::memcpy(mine.device_uuid, prop.uuid.bytes, sizeof(mine.device_uuid));
  mine.num_nvl_bytes = options.num_nvl_bytes;
  mine.num_rdma_bytes = options.num_rdma_bytes;
  mine.low_latency_mode = options.low_latency_mode;
  mine.use_fabric = options.use_fabric;
  mine.ranks_per_node_override = ranks_per_node_from_env();
  mine.force_nccl_window = force_nccl_window_from_env() ? 1 : 0;
  // The internode combine reads each node's inputs in place unless DEEP_EP_INTERNODE_IN_PLACE=0.
  mine.internode_in_place = switched_on("DEEP_EP_INTERNODE_IN_PLACE") ? 1 : 0;
  // Which internode dispatches push rows for the own node into its ranks' outputs (OwnNodePush).
  mine.internode_own_node_push = static_cast<int>(own_node_push_from_env());
  // No probe (C++ callers without a framework allocator): nothing to find out, the in-place forms stay.
  IpcAllocation probe;
  const bool exportable = options.allocator_probe_address == 0 ||
                          find_ipc_allocation(reinterpret_cast<const void*>(options.allocator_probe_address), &probe);
  mine.tensors_exportable = exportable ? 1 : 0;
  return mine;
}

// Combine input exports over `over` (the whole group, or this rank's node) on every rank of `group`, or on none:
// one answer everywhere, since a rank that pushes rows and one that reads in place cannot pair. A rank whose
// creation throws (memory, CUDA) has met the creation's collectives and meets the all_gather here too, so no
// rank is left waiting; every rank then raises, naming it.
std::unique_ptr<InputExports> make_input_exports(Group& group, Group& over, int device) {
  std::unique_ptr<InputExports> exports;
  bool failed = false;
  std::string failure;
  try {
    exports = InputExports::create(over, device);
  } catch (const std::exception& error) {
    failed = true;
    failure = error.what();
  }
  const std::vector<std::string> flags = group.all_gather(failed ? "E" : exports ? "1" : "0");
  for (int r = 0; r < static_cast<int>(flags.size()); ++r)
    DEEP_EP_RUNTIME_CHECK(flags[r] != "E", "Buffer creation: rank ", r, " could not make its combine input exports",
                          r == group.rank() ? ": " + failure : std::string(" (that rank raised the cause)"));
  for (const std::string& flag : flags)
    if (flag != "1") return nullptr;  // shared memory failed somewhere: every rank goes without
  return exports;
}

// GIN builds: a group that spans hosts (and is not mapped through fabric memory) needs the network before
// the memory: where NCCL reports GIN, the buffer must be NCCL window memory (cuMem), so the hosts, the
// communicator and GIN support are settled first. Collective: every rank runs this build. Sets
// in.gin_window. Nothing in other builds.
void connect_network_before_memory(Buffer::Internals& in, Group& group, const BufferOptions& options,
                                   const PeerInfo& mine, int rank, int num_ranks, int num_device_sms) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (options.use_fabric) return;
  const std::vector<PeerInfo> early = gather_peer_infos(group, mine, num_ranks);
  const Topology hosts = make_topology(locations_of(early), 0);
  for (int r = 0; r < num_ranks; ++r)
    DEEP_EP_CHECK(early[r].force_nccl_window == mine.force_nccl_window, "all ranks must see the same ",
                  kForceNcclWindowEnv, ": rank ", rank, " has ", mine.force_nccl_window, ", rank ", r, " has ",
                  early[r].force_nccl_window);
  const bool forced = mine.force_nccl_window != 0;
  if (hosts.num_nodes > 1 || forced) {
    // The signal ranges fit the nodes the ops will see (DEEP_EP_RANKS_PER_NODE may split hosts).
    const int num_nodes = make_topology(locations_of(early), mine.ranks_per_node_override).num_nodes;
    connect_network(in, group, options, true, num_nodes, num_device_sms, hosts.num_nodes > 1);
    // Window memory only if every rank has GIN (or it is forced): registering the window is collective.
    const auto reports = group.all_gather(std::string(1, in.network.nccl_reports_gin || forced ? '1' : '0'));
    in.gin_window = true;
    for (const std::string& r : reports) in.gin_window = in.gin_window && r == "1";
  }
#else
  (void)in, (void)group, (void)options, (void)mine, (void)rank, (void)num_ranks, (void)num_device_sms;
#endif
}

// This rank's [control region | NVLink payload | RDMA payload], zeroed, and the handle peers open it
// with (in `mine`): NCCL window memory, a fabric pool, or cudaMalloc + CUDA IPC.
void allocate_local_memory(Buffer::Internals& in, const BufferOptions& options, PeerInfo& mine) {
  if (in.gin_window) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
    in.local_base = static_cast<char*>(NcclCommunicator::allocate_window_memory(static_cast<size_t>(in.total_bytes)));
#endif
  } else if (options.use_fabric) {
    cudaMemPool_t fabric_pool = nullptr;
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeFabric;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = options.device;
    DEEP_EP_CUDA_CHECK(cudaMemPoolCreate(&fabric_pool, &props));
    void* p = nullptr;
    DEEP_EP_CUDA_CHECK(cudaMallocFromPoolAsync(&p, in.total_bytes, fabric_pool, nullptr));
    DEEP_EP_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    in.local_base = static_cast<char*>(p);
    DEEP_EP_CUDA_CHECK(
        cudaMemPoolExportToShareableHandle(&mine.fabric_pool_handle, fabric_pool, cudaMemHandleTypeFabric, 0));
    DEEP_EP_CUDA_CHECK(cudaMemPoolExportPointer(&mine.fabric_ptr, p));
  } else {
    void* p = nullptr;
    DEEP_EP_CUDA_CHECK(cudaMalloc(&p, in.total_bytes));
    in.local_base = static_cast<char*>(p);
    DEEP_EP_CUDA_CHECK(cudaIpcGetMemHandle(&mine.ipc_handle, p));
  }
  // The control region starts zeroed: barrier epochs and queue counters count up from 0.
  DEEP_EP_CUDA_CHECK(cudaMemset(in.local_base, 0, kControlRegionBytes));
  // So does the RDMA payload: low-latency signals carry a tag counted from 1, and memory left over
  // from an earlier buffer could otherwise hold a matching one.
  // The NVLink payload too: internode flags count up from 0.
  if (options.num_nvl_bytes + options.num_rdma_bytes > 0)
    DEEP_EP_CUDA_CHECK(
        cudaMemset(in.local_base + in.nvl_payload_offset, 0, options.num_nvl_bytes + options.num_rdma_bytes));
  mine.base_ptr = reinterpret_cast<uint64_t>(in.local_base);
}

// Pinned host memory the notify kernels publish received counts into (mapped into the device).
void allocate_host_counts(Buffer::Internals& in) {
  void* host = nullptr;
  DEEP_EP_CUDA_CHECK(cudaHostAlloc(&host, sizeof(HostMapped), cudaHostAllocMapped));
  std::memset(host, 0, sizeof(HostMapped));
  in.host = static_cast<HostMapped*>(host);
  void* host_device = nullptr;
  DEEP_EP_CUDA_CHECK(cudaHostGetDevicePointer(&host_device, host, 0));
  in.host_device = static_cast<HostMapped*>(host_device);
}

// Every rank made its Buffer the same way: sizes, handle kind, node grouping.
void check_peers_agree(const std::vector<PeerInfo>& peers, const PeerInfo& mine, const BufferOptions& options,
                       int rank) {
  for (int r = 0; r < static_cast<int>(peers.size()); ++r) {
    DEEP_EP_CHECK(peers[r].num_nvl_bytes == options.num_nvl_bytes && peers[r].num_rdma_bytes == options.num_rdma_bytes,
                  "all ranks must create Buffer with the same sizes: rank ", rank,
                  " has num_nvl_bytes=", options.num_nvl_bytes, " num_rdma_bytes=", options.num_rdma_bytes, ", rank ",
                  r, " has ", peers[r].num_nvl_bytes, " and ", peers[r].num_rdma_bytes);
    DEEP_EP_CHECK(peers[r].use_fabric == mine.use_fabric, "all ranks must agree on use_fabric (rank ", r, " differs)");
    // Ranks that group nodes differently would run different ops and wait for each other forever.
    DEEP_EP_CHECK(peers[r].ranks_per_node_override == mine.ranks_per_node_override,
                  "all ranks must see the same DEEP_EP_RANKS_PER_NODE: rank ", rank, " has ",
                  mine.ranks_per_node_override, ", rank ", r, " has ", peers[r].ranks_per_node_override,
                  " (0 = unset)");
    // The producers' ring entries of the two combine forms differ: every rank must run the same one.
    DEEP_EP_CHECK(peers[r].internode_in_place == mine.internode_in_place,
                  "all ranks must see the same DEEP_EP_INTERNODE_IN_PLACE: rank ", rank, " has ",
                  mine.internode_in_place, ", rank ", r, " has ", peers[r].internode_in_place, " (0 = set to 0)");
    // A receiver that expects pushed rows and a sender that stages them would drop the rows' payload.
    DEEP_EP_CHECK(peers[r].internode_own_node_push == mine.internode_own_node_push,
                  "all ranks must see the same DEEP_EP_INTERNODE_OWN_NODE_PUSH: rank ", rank, " has ",
                  mine.internode_own_node_push, ", rank ", r, " has ", peers[r].internode_own_node_push,
                  " (0: set to 0, 1: unset, 2: set to 1)");
  }
}

// in.peer_bases: each rank's buffer as this process reaches it: the own pointer (same process), a
// fabric import or a CUDA IPC mapping (same host), or null (another host: a network transport only;
// with an NCCL window NCCL maps the peers later).
void open_peer_memory(Buffer::Internals& in, const std::vector<PeerInfo>& peers, const PeerInfo& mine,
                      const BufferOptions& options, int rank) {
  const int num_ranks = static_cast<int>(peers.size());
  in.peer_bases.assign(num_ranks, nullptr);
  in.peer_is_ipc.assign(num_ranks, false);
  for (int r = 0; r < num_ranks; ++r) {
    const PeerInfo& p = peers[r];
    const bool same_process = p.pid == mine.pid && std::strncmp(p.hostname, mine.hostname, sizeof(mine.hostname)) == 0;
    const bool same_host = std::strncmp(p.hostname, mine.hostname, sizeof(mine.hostname)) == 0;
    if (r == rank || same_process) {
      in.peer_bases[r] = reinterpret_cast<char*>(p.base_ptr);
    } else if (in.gin_window) {
      // Mapped through NCCL (map_peers_through_nccl).
    } else if (!same_host && !options.use_fabric) {
      // Another host: reachable only through a network transport (internode ops check this).
      in.peer_bases[r] = nullptr;
    } else if (options.use_fabric) {
      cudaMemPool_t imported = nullptr;
      DEEP_EP_CUDA_CHECK(cudaMemPoolImportFromShareableHandle(
          &imported, const_cast<cudaMemFabricHandle_t*>(&p.fabric_pool_handle), cudaMemHandleTypeFabric, 0));
      cudaMemAccessDesc access{};
      access.location.type = cudaMemLocationTypeDevice;
      access.location.id = options.device;
      access.flags = cudaMemAccessFlagsProtReadWrite;
      DEEP_EP_CUDA_CHECK(cudaMemPoolSetAccess(imported, &access, 1));
      void* ptr = nullptr;
      DEEP_EP_CUDA_CHECK(
          cudaMemPoolImportPointer(&ptr, imported, const_cast<cudaMemPoolPtrExportData*>(&p.fabric_ptr)));
      in.peer_bases[r] = static_cast<char*>(ptr);
    } else {
      void* ptr = nullptr;
      DEEP_EP_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, p.ipc_handle, cudaIpcMemLazyEnablePeerAccess));
      in.peer_bases[r] = static_cast<char*>(ptr);
      in.peer_is_ipc[r] = true;
    }
  }
}

// GIN builds with an NCCL window: collective: the whole buffer becomes the communicator's window; NCCL
// maps the ranks it reaches by load/store, and the kernels need that for every rank of their own node.
void map_peers_through_nccl(Buffer::Internals& in, int rank, int num_ranks) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (!in.gin_window) return;
  in.peer_bases = transport_launch::register_buffer(in, rank, num_ranks);
  for (int r = 0; r < num_ranks; ++r)
    DEEP_EP_CHECK(in.peer_bases[r] != nullptr || !in.topology.same_node(r, rank), "rank ", rank, " and rank ", r,
                  " are on one node, but NCCL does not map rank ", r, "'s buffer here (its load/store team); ",
                  "the kernels reach the ranks of their node by load/store");
#else
  (void)in, (void)rank, (void)num_ranks;
#endif
}

// The device copy of in.peer_bases the kernels index.
void publish_peer_table(Buffer::Internals& in) {
  void* table = nullptr;
  const size_t bytes = sizeof(char*) * in.peer_bases.size();
  DEEP_EP_CUDA_CHECK(cudaMalloc(&table, bytes));
  DEEP_EP_CUDA_CHECK(cudaMemcpy(table, in.peer_bases.data(), bytes, cudaMemcpyHostToDevice));
  in.peer_bases_device = static_cast<char**>(table);
}

}  // namespace

// Collective over the group. Each phase is a function above; the collective ones (gathers, barriers,
// window registration) run on every rank in the same order.
Buffer::Buffer(std::shared_ptr<Group> group, const BufferOptions& options)
    : group_(std::move(group)), options_(options), internals_(std::make_unique<Internals>()) {
  DEEP_EP_CHECK(group_ != nullptr, "Buffer needs a group");
  rank_ = group_->rank();
  num_ranks_ = group_->size();
  DEEP_EP_CHECK(options.num_nvl_bytes >= 0 && options.num_nvl_bytes % 128 == 0,
                "num_nvl_bytes must be a non-negative multiple of 128, got ", options.num_nvl_bytes);
  DEEP_EP_CHECK(options.num_rdma_bytes >= 0 && options.num_rdma_bytes % 128 == 0,
                "num_rdma_bytes must be a non-negative multiple of 128, got ", options.num_rdma_bytes);
  auto& in = *internals_;
  in.timeout_ns = default_timeout_ns(options.timeout_s);

  DEEP_EP_CUDA_CHECK(cudaSetDevice(options.device));
  cudaDeviceProp prop{};
  DEEP_EP_CUDA_CHECK(cudaGetDeviceProperties(&prop, options.device));
  num_device_sms_ = prop.multiProcessorCount;
  if (options.use_fabric)
    DEEP_EP_CHECK_AS(std::runtime_error, fabric_supported(options.device), "use_fabric=True, but cuda:", options.device,
                     " (driver) does not support fabric memory handles; use the default CUDA IPC handles");

  // One allocation: control region, then the NVLink payload, then the RDMA/low-latency payload.
  in.rdma_payload_offset = in.nvl_payload_offset + options.num_nvl_bytes;
  in.total_bytes = in.rdma_payload_offset + options.num_rdma_bytes;
  PeerInfo mine = describe_self(options, prop);
  connect_network_before_memory(in, *group_, options, mine, rank_, num_ranks_, num_device_sms_);
  allocate_local_memory(in, options, mine);
  allocate_host_counts(in);
  DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());

  const std::vector<PeerInfo> peers = gather_peer_infos(*group_, mine, num_ranks_);
  check_peers_agree(peers, mine, options, rank_);
  in.topology = make_topology(locations_of(peers), mine.ranks_per_node_override);
  in.internode_in_place = mine.internode_in_place != 0;
  in.internode_own_node_push = static_cast<OwnNodePush>(mine.internode_own_node_push);
  in.tensors_exportable =
      std::all_of(peers.begin(), peers.end(), [](const PeerInfo& peer) { return peer.tensors_exportable != 0; });
  // What the dispatches size their rings with (intranode_rings.hpp, internode_rings.hpp), the same on every rank.
  in.max_ranks_per_device = *std::max_element(in.topology.ranks_per_device.begin(), in.topology.ranks_per_device.end());
  in.min_l2_bytes = mine.l2_bytes;
  for (const PeerInfo& peer : peers) in.min_l2_bytes = std::min(in.min_l2_bytes, peer.l2_bytes);
  if (in.topology.num_nodes == 1)
    DEEP_EP_CHECK(num_ranks_ <= kNumMaxNvlPeers, "a single node holds at most ", kNumMaxNvlPeers,
                  " ranks in this build; got a group of ", num_ranks_,
                  " on one host (set DEEP_EP_RANKS_PER_NODE to emulate several nodes)");
  num_ranks_per_device_ = in.topology.ranks_per_device[rank_];
  open_peer_memory(in, peers, mine, options, rank_);
  map_peers_through_nccl(in, rank_, num_ranks_);
  publish_peer_table(in);

  // Without a network step above (one host, or a build without GIN), record what the transport choice
  // needs: whether any peer is unmapped, and (GIN builds) the communicator for it.
  if (!in.nccl)
    connect_network(in, *group_, options, in.first_unmapped_peer() >= 0, in.topology.num_nodes, num_device_sms_);
  // The pull combine's per-call address exchange and its host-free input exports, where that combine can run:
  // intranode ops only (a group of one node, at most kNumMaxNvlPeers ranks), every peer mapped by CUDA IPC.
  // Collective, so they are made here with the rest of the buffer: a rank that skips a combine then costs the
  // others a bounded wait in the exchange instead of a mismatched group collective.
  // Neither where some rank's tensors cannot be exported (BufferOptions::allocator_probe_address): the rings run.
  if (in.topology.num_nodes == 1 && !in.gin_window && !options.use_fabric && in.first_unmapped_peer() < 0 &&
      in.tensors_exportable) {
    in.pull_exchange = HostExchange::create(*group_, PeerTensorMap::record_bytes(), in.timeout_ns * 1e-9);
    in.input_exports = make_input_exports(*group_, *group_, options.device);
  }
  // The internode combine in place (the default; DEEP_EP_INTERNODE_IN_PLACE=0 pushes rows): the same exports over
  // each node's ranks, where every rank maps its node's buffers by CUDA IPC, every rank's tensors can be exported,
  // and every node can make them. Every rank takes part in the decision and in each node's creation (collectives
  // over the whole group), so a node that cannot never leaves the others waiting.
  if (in.topology.num_nodes > 1 && in.internode_in_place && in.tensors_exportable) {
    const int Rn = in.topology.num_ranks_per_node, first_local = rank_ / Rn * Rn;
    // The exports' tables hold kNumMaxNvlPeers ranks: larger nodes push rows.
    bool node_mapped = !in.gin_window && !options.use_fabric && Rn <= kNumMaxNvlPeers;
    for (int r = first_local; r < first_local + Rn; ++r) node_mapped = node_mapped && in.peer_bases[r] != nullptr;
    bool every_node_mapped = true;
    for (const std::string& flag : group_->all_gather(node_mapped ? "1" : "0"))
      every_node_mapped = every_node_mapped && flag == "1";
    if (every_node_mapped) {
      NodeGroup node_group(*group_, Rn);
      // Shared memory may fail on one node only: then every node pushes rows.
      in.input_exports = make_input_exports(*group_, node_group, options.device);
    }
  }
  // Every rank's memory is zeroed and opened before anyone launches a kernel that touches a peer.
  group_->barrier();
  available_ = true;
}

bool Buffer::tensors_exportable() const { return internals().tensors_exportable; }

Buffer::~Buffer() {
  try {
    release(false);
  } catch (...) {
    // A destructor must not throw; destroy() is the path that reports errors.
  }
}

void Buffer::destroy() {
  DEEP_EP_RUNTIME_CHECK(available_, "Buffer.destroy(): the buffer was already destroyed");
  release(true);
}

void Buffer::release(bool collective) {
  if (!available_) return;
  available_ = false;
  auto& in = *internals_;
  cudaSetDevice(options_.device);
  if (collective) {
    // No peer may still run a kernel that reads our memory when we free it.
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    group_->barrier();
  } else {
    cudaDeviceSynchronize();
  }
  in.peer_tensors.close_all();
  in.pull_exchange.reset();
  in.input_exports.reset();  // after the synchronize above: no kernel reads through its mappings
  for (int r = 0; r < num_ranks_; ++r)
    if (in.peer_is_ipc[r]) cudaIpcCloseMemHandle(in.peer_bases[r]);
  if (in.peer_bases_device) cudaFree(in.peer_bases_device);
  if (in.gin_window) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
    in.nccl.reset();  // deregisters the window (collective) before its memory goes
    NcclCommunicator::free_window_memory(in.local_base);
#endif
  } else if (in.local_base) {
    cudaFree(in.local_base);
  }
  if (in.host) cudaFreeHost(in.host);
  in = Internals{};
  if (collective) group_->barrier();
}

int Buffer::num_nodes() const { return internals_->topology.num_nodes > 0 ? internals_->topology.num_nodes : 1; }

int Buffer::num_ranks_per_node() const {
  return internals_->topology.num_ranks_per_node > 0 ? internals_->topology.num_ranks_per_node : num_ranks_;
}

void Buffer::Internals::wait_for_notify_counts(Buffer& buffer, const char* op) {
  const auto start = std::chrono::steady_clock::now();
  const auto limit = std::chrono::nanoseconds(2 * timeout_ns) + std::chrono::seconds(5);
  while (host->counts_ready != counts_epoch) {
    buffer.check_device_errors();
    if (std::chrono::steady_clock::now() - start > limit)
      throw TimeoutError(detail::concat("deep_ep timeout on rank ", buffer.rank(), ": ", op, " waited ",
                                        2 * timeout_ns / 1e9 + 5, " s for the received-token count of notify (phase ",
                                        phase_name(Phase::kNotifyCounts), "); a peer rank did not join"));
    std::this_thread::yield();
  }
}

void* Buffer::local_nvl_buffer() const {
  DEEP_EP_RUNTIME_CHECK(available_, "the Buffer was destroyed");
  return internals_->local_base + internals_->nvl_payload_offset;
}

void* Buffer::local_rdma_buffer() const {
  DEEP_EP_RUNTIME_CHECK(available_, "the Buffer was destroyed");
  return internals_->local_base + internals_->rdma_payload_offset;
}

namespace {

// The intranode control state of every mapped rank, for the message of an intranode timeout: barrier and
// pull-combine epochs, and for a ring wait the counters of the stuck (channel, peer) pair. Copied on a stream of
// its own (the kernels that wait may still be spinning). Best effort: empty for other phases or when a copy fails.
std::string control_snapshot(const std::vector<char*>& peer_bases, int rank, Phase phase, int peer, int channel) {
  const bool dispatch_ring =
      phase == Phase::kDispatchWaitSpace || phase == Phase::kDispatchWaitData || phase == Phase::kDispatchDrain;
  const bool combine_ring = phase == Phase::kCombineWaitSpace || phase == Phase::kCombineWaitData;
  const bool intranode = dispatch_ring || combine_ring || phase == Phase::kBarrier || phase == Phase::kNotifyCounts ||
                         phase == Phase::kPullCombineReady || phase == Phase::kPullCombineDone ||
                         phase == Phase::kPushDispatchReady || phase == Phase::kPushDispatchDone;
  if (peer_bases.empty() || !intranode) return {};
  const bool ring = (dispatch_ring || combine_ring) && channel >= 0 && channel < kMaxChannels;
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  const int R = static_cast<int>(peer_bases.size());
  std::vector<int> epochs(R, -1), pull_epochs(R, -1), tails(R, -1), heads(R, -1);
  auto copy = [&](int* dst, const char* base, size_t offset) {
    if (base) cudaMemcpyAsync(dst, base + offset, sizeof(int), cudaMemcpyDeviceToHost, stream);
  };
  // tail[channel][r] here: what rank r has sent this rank; head[channel][rank] at r: what this rank released of
  // rank r's sends.
  const size_t tail_offset =
      dispatch_ring ? offsetof(ControlRegion, dispatch_tail) : offsetof(ControlRegion, combine_tail);
  const size_t head_offset =
      dispatch_ring ? offsetof(ControlRegion, dispatch_head) : offsetof(ControlRegion, combine_head);
  for (int r = 0; r < R; ++r) {
    copy(&epochs[r], peer_bases[r], offsetof(ControlRegion, barrier_epoch));
    copy(&pull_epochs[r], peer_bases[r], offsetof(ControlRegion, pull_epoch));
    if (!ring) continue;
    copy(&tails[r], peer_bases[rank], tail_offset + sizeof(int) * (channel * kNumMaxNvlPeers + r));
    copy(&heads[r], peer_bases[r], head_offset + sizeof(int) * (channel * kNumMaxNvlPeers + rank));
  }
  const bool ok = cudaStreamSynchronize(stream) == cudaSuccess;
  cudaStreamDestroy(stream);
  cudaGetLastError();
  if (!ok) return {};
  auto list = [](const std::vector<int>& v) {
    std::string out;
    for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
    return out;
  };
  std::string out =
      detail::concat(" [control state: barrier epochs ", list(epochs), "; pull epochs ", list(pull_epochs));
  if (ring)
    out += detail::concat("; channel ", channel, " tails here ", list(tails), "; heads of this rank at each ",
                          list(heads), "; peer ", peer);
  return out + "]";
}

}  // namespace

void Buffer::check_device_errors() {
  DEEP_EP_RUNTIME_CHECK(available_, "the Buffer was destroyed");
  auto& in = *internals_;
  if (in.poisoned) throw std::runtime_error("deep_ep Buffer is unusable after an earlier error: " + in.poison_message);
  volatile DeviceDiagnostics* d = &in.host->diagnostics;
  if (!d->ready) return;
  const Phase phase = static_cast<Phase>(d->phase);
  std::string msg;
  if (d->is_timeout) {
    msg = detail::concat("deep_ep timeout on rank ", d->rank, ": waited for peer rank ", d->peer, " on channel ",
                         d->channel, " in phase ", phase_name(phase), " (expected ", d->expected, ", observed ",
                         d->observed, "); the buffer must be re-created",
                         control_snapshot(in.peer_bases, rank_, phase, d->peer, d->channel));
    in.poison(msg);
    throw TimeoutError(msg);
  }
  if (phase == Phase::kPullCombineMap || phase == Phase::kInternodeCombineMap || phase == Phase::kPushDispatchMap) {
    // The op stopped without touching that peer's tensors, so the peers' next waits would fail: unusable.
    const char* what = phase == Phase::kPushDispatchMap ? "an output" : "the input";
    msg = detail::concat("deep_ep error on rank ", d->rank, " in ", phase_name(phase), ": ", what, " of peer rank ",
                         d->peer, " could not be mapped into this process (import state ", d->observed, ", expected ",
                         d->expected, "; cudaIpcOpenMemHandle failed or the export moved on); the buffer must be ",
                         "re-created");
    in.poison(msg);
    throw std::runtime_error(msg);
  }
  if (phase == Phase::kLowLatencyOverrun) {
    // The ranks' low-latency state no longer agrees: only a collective clean recovers it.
    msg = detail::concat("deep_ep error on rank ", d->rank, " in ", phase_name(phase), ": peer rank ", d->peer,
                         " signalled op ", d->observed, " while op ", d->expected,
                         " was expected; the buffer must be "
                         "re-created");
    in.poison(msg);
    throw std::runtime_error(msg);
  }
  if (phase == Phase::kInternodeTooManyRows) {
    msg = detail::concat("deep_ep device error on rank ", d->rank, " in ", phase_name(phase), ": source rank ", d->peer,
                         " brings row ", d->observed, " but num_worst_tokens=", d->expected,
                         "; the extra rows were dropped, outputs of that call are incomplete");
  } else if (phase == Phase::kDispatchTooManyRows) {
    msg = detail::concat("deep_ep device error on rank ", d->rank, " in ", phase_name(phase), ": it receives at least ",
                         d->observed, " rows but num_worst_tokens=", d->expected,
                         "; the extra rows were dropped, outputs of that call are incomplete");
  } else if (phase == Phase::kLowLatencyTooManyRows) {
    msg =
        detail::concat("deep_ep device error on rank ", d->rank, " in ", phase_name(phase), ": token ", d->token,
                       " is row ", d->observed, " to expert ", d->channel, ", but a source rank has only ", d->expected,
                       " slots per expert (a token lists that expert more than once); the extra rows "
                       "were dropped, outputs of that call are incomplete");
  } else {
    msg = detail::concat("deep_ep device error on rank ", d->rank, " in ", phase_name(phase), ": token ", d->token,
                         " has expert id ", d->observed, ", expected -1 or a value in [0, ", d->expected,
                         "); the invalid entries were skipped, outputs of that call are incomplete");
  }
  if (d->abort_waits) {
    // An error that ends the op came after the value error and found the record taken: the waits of this rank's
    // kernels were abandoned, so the ranks' ops no longer pair.
    msg += "; an error that ended a later wait on this rank was reported after it, so the buffer must be re-created";
    in.poison(msg);
    throw std::runtime_error(msg);
  }
  // A value error is reported once; the buffer stays usable.
  d->ready = 0;
  d->claimed = 0;
  throw ValueError(msg);
}

}  // namespace deep_ep
