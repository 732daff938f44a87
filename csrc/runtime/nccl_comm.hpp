// Host side of the GIN transport (docs/design.md decision 4): the NCCL communicator, the device
// communicator (ncclDevComm) that GIN kernels take, and the windows they put into. Built only with
// -DDEEP_EP_ENABLE_GIN=ON, the one part of the runtime that links libnccl.
//
// Where the communicator comes from:
//  - created (NcclCommunicator::create): rank 0 of the bootstrap Group calls ncclGetUniqueId, the id
//    travels to every rank through Group::all_gather, and each rank calls ncclCommInitRank with the
//    group's size and rank on its current CUDA device. Owned: ncclCommDestroy in the destructor.
//  - adopted (NcclCommunicator::adopt): an ncclComm_t that exists already, such as the one behind
//    torch's ProcessGroupNCCL, passed as an integer address. Not owned, never destroyed here. It must
//    outlive this object, come from the libnccl loaded in this process, and span the group in the
//    group's rank order on the current CUDA device (checked with ncclCommCount, ncclCommUserRank and
//    ncclCommCuDevice before anything else is done with it).
//
// What "GIN supported" means: NCCL 2.28 has no host query for it. A communicator supports GIN when
// the device communicator NCCL creates for it has ginContextCount > 0, i.e. NCCL connected
// GPU-initiated networking contexts over a GIN-capable NIC on every rank. In 2.28, a request for GIN
// signals or contexts (and any communicator spanning several nodes) makes ncclDevCommCreate connect
// GIN; where the network cannot, that call fails, and create_device_comm throws NcclError carrying
// NCCL's reason ("GIN not supported", "No GIN-capable devices found"), rather than returning zero
// contexts. A device communicator requested with no GIN signals and contexts on one node has
// ginContextCount == 0: every peer then needs P2P.
//
// Collective calls: create, create_device_comm, register_window and the destructor (which
// deregisters the windows and destroys the device communicator) must be made by every rank of the
// group, in the same order.
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "deep_ep/group.hpp"
#include "deep_ep/transport.hpp"

namespace deep_ep {

// An NCCL call failed. The message names the call, the result and NCCL's last-error text.
class NcclError : public std::runtime_error {
 public:
  NcclError(const std::string& message, ncclResult_t result) : std::runtime_error(message), result_(result) {}
  ncclResult_t result() const { return result_; }

 private:
  ncclResult_t result_;
};

// "ncclInvalidArgument" for ncclInvalidArgument, and so on; "ncclResult_t(<n>)" for unknown codes.
std::string nccl_result_name(ncclResult_t result);

// The text of an NcclError: "NCCL error in <call> at <file>:<line>: <result name> (<error_string>)",
// then "; NCCL's last error: <last_error>" when last_error is non-empty.
std::string nccl_error_message(const char* call, ncclResult_t result, const char* error_string, const char* last_error,
                               const char* file, int line);

// Throws NcclError with ncclGetErrorString(result) and ncclGetLastError(comm); comm may be null
// (before a communicator exists, NCCL reports its process-wide last error).
[[noreturn]] void throw_nccl_error(const char* call, ncclResult_t result, ncclComm_t comm, const char* file, int line);

}  // namespace deep_ep

// Every NCCL return code is checked: anything but ncclSuccess throws NcclError naming the call.
#define DEEP_EP_NCCL_CHECK(call, comm)                                                                             \
  do {                                                                                                             \
    const ncclResult_t nccl_result_ = (call);                                                                      \
    if (nccl_result_ != ncclSuccess) ::deep_ep::throw_nccl_error(#call, nccl_result_, (comm), __FILE__, __LINE__); \
  } while (0)

namespace deep_ep {

// The id exchange of ncclCommInitRank. Rank 0 calls make_id; every rank, rank 0 included, returns
// rank 0's id as it came through group.all_gather (one all_gather, so collective over the group).
// When make_id throws on rank 0, the other ranks still leave the all_gather and throw a
// std::runtime_error quoting rank 0's message, and rank 0 rethrows its own exception. A contribution
// of rank 0 that is not an id of sizeof(ncclUniqueId) bytes is a ValueError naming both sizes.
ncclUniqueId exchange_unique_id(Group& group, const std::function<ncclUniqueId()>& make_id);

// Throws ValueError unless libnccl of runtime_version runs code compiled against the headers of
// compiled_version (both in NCCL_VERSION_CODE form): it must not be older, and for headers before
// 2.29, whose ncclDevComm and ncclDevCommRequirements carry no version, it must be the same
// major.minor release (kernels take ncclDevComm by value, so its layout must match).
void check_nccl_version_compatible(int compiled_version, int runtime_version);

// The checks on an address given to adopt that need no dereference: 0 (null; torch creates its
// communicators lazily, on the first collective, unless the process group was bound to a device),
// negative values, addresses in the never-mapped first page and addresses not aligned for a pointer
// are ValueErrors. Anything else is returned as is; NCCL then reads through it.
ncclComm_t comm_from_address(std::int64_t comm_address);

// Throws ValueError naming both sides unless an adopted communicator of comm_num_ranks ranks, in
// which this process is comm_rank, is the group (same size, same rank).
void check_comm_matches_group(int comm_num_ranks, int comm_rank, int group_size, int group_rank);

// Whether NCCL gave this device communicator GIN contexts.
inline bool dev_comm_reports_gin(const ncclDevComm& dev_comm) { return dev_comm.ginContextCount > 0; }

class NcclCommunicator {
 public:
  // Collective over the group: a new communicator of group.size() ranks, this process being
  // group.rank(), on the current CUDA device.
  static std::unique_ptr<NcclCommunicator> create(Group& group);
  // Not collective: wraps the communicator at comm_address after the checks above.
  static std::unique_ptr<NcclCommunicator> adopt(std::int64_t comm_address, const Group& group);

  // Collective when a window or device communicator exists. Never throws; a failing NCCL call is
  // reported on stderr and the rest is still released.
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  ncclComm_t comm() const { return comm_; }
  bool owns_comm() const { return owns_comm_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }

  // Collective, once per object: ncclDevCommCreate asking for num_gin_signals GIN signals (NCCL
  // numbers them from 0, the ids GinTransport::signal_start counts from) and num_gin_contexts GIN
  // contexts (a hint: NCCL decides the count, read it from num_gin_contexts()). Asking for either
  // asks for GIN, which fails where the network has none (see the top of this file); asking for
  // neither gives a device communicator without GIN on one node. Needs a communicator with
  // symmetric-memory support (NCCL's CUDA VMM path, on unless NCCL_CUMEM_ENABLE=0).
  void create_device_comm(int num_gin_signals, int num_gin_contexts);
  bool has_device_comm() const { return has_dev_comm_; }
  // ValueError before create_device_comm.
  const ncclDevComm& device_comm() const;
  // False until the device communicator exists.
  bool gin_supported() const { return has_dev_comm_ && dev_comm_reports_gin(dev_comm_); }
  int num_gin_contexts() const { return has_dev_comm_ ? dev_comm_.ginContextCount : 0; }

  // Collective: registers [ptr, ptr + num_bytes) as a symmetric window (NCCL_WIN_COLL_SYMMETRIC:
  // every rank registers the same num_bytes), deregistered by the destructor.
  //
  // Window memory, as NCCL 2.28 requires it: NCCL maps each rank's range for its peers through the
  // range's CUDA VMM allocation handle (cuMemRetainAllocationHandle), so the memory must come from
  // cuMemCreate + cuMemMap or from ncclMemAlloc (allocate_window_memory below), not from cudaMalloc
  // or a caching allocator built on it. NCCL wants ptr's offset from the start of its allocation to
  // be a multiple of NCCL_WIN_REQUIRED_ALIGNMENT (4096); VMM allocations start at a coarser
  // granularity, so ptr itself must be 4096-aligned (checked here). The memory must stay allocated
  // until this object is destroyed.
  ncclWindow_t register_window(void* ptr, std::size_t num_bytes);
  const std::vector<ncclWindow_t>& windows() const { return windows_; }

  // ncclMemAlloc on the current CUDA device: VMM memory that register_window accepts. NCCL may round
  // the size up to its allocation granularity. Release with free_window_memory after the windows
  // over it are gone.
  static void* allocate_window_memory(std::size_t num_bytes);
  // ncclMemFree; null is a no-op. Never throws (it runs in destructors); failures go to stderr.
  static void free_window_memory(void* ptr) noexcept;

 private:
  NcclCommunicator(ncclComm_t comm, bool owns_comm, int rank, int num_ranks);

  ncclComm_t comm_;
  bool owns_comm_;
  int rank_, num_ranks_;
  // NCCL fills dev_comm_ in place and takes it back by address in ncclDevCommDestroy; the object
  // never moves (factories return it by unique_ptr).
  ncclDevComm dev_comm_{};
  bool has_dev_comm_ = false;
  std::vector<ncclWindow_t> windows_;
};

// Sets inputs.nccl_available (a communicator exists) and inputs.nccl_reports_gin (its device
// communicator has GIN contexts) from communicator, which is null when the runtime has none.
void fill_nccl_transport_inputs(const NcclCommunicator* communicator, TransportChoiceInputs& inputs);

}  // namespace deep_ep
