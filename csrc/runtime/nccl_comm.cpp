// NcclCommunicator (nccl_comm.hpp): obtains the NCCL communicator of the GIN transport, creates its
// device communicator and windows, and turns every NCCL failure into an NcclError.
#include "runtime/nccl_comm.hpp"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <exception>

#include "deep_ep/error.hpp"

namespace deep_ep {

namespace {

// A contribution to the id exchange starts with one of these tags: an id follows kIdTag, rank 0's
// error message follows kErrorTag. Other ranks contribute nothing.
constexpr char kIdTag = 'I';
constexpr char kErrorTag = 'E';

// Linux never maps the first page (vm.mmap_min_addr >= 4096).
constexpr std::int64_t kFirstMappableAddress = 4096;

// "2.28.9" for 22809; codes before 2.9 used X * 1000 + Y * 100 + Z.
std::string version_string(int version) {
  const bool new_form = version >= 10000;
  const int major = new_form ? version / 10000 : version / 1000;
  const int minor = new_form ? version % 10000 / 100 : version % 1000 / 100;
  return detail::concat(major, '.', minor, '.', version % 100);
}

int runtime_nccl_version() {
  int version = 0;
  DEEP_EP_NCCL_CHECK(ncclGetVersion(&version), nullptr);
  return version;
}

int current_cuda_device_or_minus_one() {
  int device = -1;
  return cudaGetDevice(&device) == cudaSuccess ? device : -1;
}

// Destructor path: report a failed release on stderr and carry on.
void report_if_failed(const char* call, ncclResult_t result, ncclComm_t comm, int line) noexcept {
  if (result == ncclSuccess) return;
  try {
    const std::string message =
        nccl_error_message(call, result, ncclGetErrorString(result), ncclGetLastError(comm), __FILE__, line);
    std::fprintf(stderr, "deep_ep: while releasing NCCL resources: %s\n", message.c_str());
  } catch (...) {
    std::fprintf(stderr, "deep_ep: while releasing NCCL resources: %s failed\n", call);
  }
}

}  // namespace

std::string nccl_result_name(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "ncclSuccess";
    case ncclUnhandledCudaError:
      return "ncclUnhandledCudaError";
    case ncclSystemError:
      return "ncclSystemError";
    case ncclInternalError:
      return "ncclInternalError";
    case ncclInvalidArgument:
      return "ncclInvalidArgument";
    case ncclInvalidUsage:
      return "ncclInvalidUsage";
    case ncclRemoteError:
      return "ncclRemoteError";
    case ncclInProgress:
      return "ncclInProgress";
    default:
      break;
  }
  return detail::concat("ncclResult_t(", static_cast<int>(result), ")");
}

std::string nccl_error_message(const char* call, ncclResult_t result, const char* error_string, const char* last_error,
                               const char* file, int line) {
  std::string message = detail::concat("NCCL error in ", call, " at ", file, ":", line, ": ", nccl_result_name(result),
                                       " (", error_string, ")");
  if (last_error != nullptr && last_error[0] != '\0') message += detail::concat("; NCCL's last error: ", last_error);
  return message;
}

void throw_nccl_error(const char* call, ncclResult_t result, ncclComm_t comm, const char* file, int line) {
  throw NcclError(nccl_error_message(call, result, ncclGetErrorString(result), ncclGetLastError(comm), file, line),
                  result);
}

ncclUniqueId exchange_unique_id(Group& group, const std::function<ncclUniqueId()>& make_id) {
  std::string contribution;
  std::exception_ptr failure;
  if (group.rank() == 0) {
    try {
      const ncclUniqueId id = make_id();
      contribution.assign(1, kIdTag);
      contribution.append(reinterpret_cast<const char*>(&id), sizeof(id));
    } catch (const std::exception& e) {
      failure = std::current_exception();
      contribution = std::string(1, kErrorTag) + e.what();
    } catch (...) {
      failure = std::current_exception();
      contribution = std::string(1, kErrorTag) + "unknown exception";
    }
  }
  // Rank 0 contributes even when make_id failed, so that no rank waits for an id that never comes.
  const std::vector<std::string> contributions = group.all_gather(contribution);
  if (failure) std::rethrow_exception(failure);

  DEEP_EP_CHECK(static_cast<int>(contributions.size()) == group.size(), "NCCL unique id exchange: all_gather returned ",
                contributions.size(), " contributions for a group of ", group.size(), " ranks");
  const std::string& from_root = contributions[0];
  if (!from_root.empty() && from_root[0] == kErrorTag) {
    throw std::runtime_error(
        detail::concat("NCCL unique id exchange: rank 0 could not create the id: ", from_root.substr(1)));
  }
  DEEP_EP_CHECK(from_root.size() == 1 + sizeof(ncclUniqueId) && from_root[0] == kIdTag,
                "NCCL unique id exchange: rank 0 contributed ", from_root.size(),
                " bytes, expected a tag byte and sizeof(ncclUniqueId) = ", sizeof(ncclUniqueId), " id bytes");
  ncclUniqueId id;
  std::memcpy(&id, from_root.data() + 1, sizeof(id));
  return id;
}

void check_nccl_version_compatible(int compiled_version, int runtime_version) {
  DEEP_EP_CHECK(runtime_version >= compiled_version, "libnccl ", version_string(runtime_version),
                " is older than the NCCL headers deep_ep was built with (", version_string(compiled_version),
                "): load a libnccl at least as new");
  const bool unversioned_device_structs = compiled_version < NCCL_VERSION(2, 29, 0);
  DEEP_EP_CHECK(!unversioned_device_structs || runtime_version / 100 == compiled_version / 100, "libnccl ",
                version_string(runtime_version), " is not the release deep_ep was built with (NCCL headers ",
                version_string(compiled_version),
                "): before 2.29 ncclDevComm has no version, so the library must be of the same major.minor release");
}

ncclComm_t comm_from_address(std::int64_t comm_address) {
  DEEP_EP_CHECK(comm_address != 0,
                "adopting an NCCL communicator: the address is 0, a null ncclComm_t (torch creates a process "
                "group's NCCL communicator lazily, on its first collective, unless the group was bound to a device)");
  DEEP_EP_CHECK(comm_address > 0, "adopting an NCCL communicator: the address ", comm_address,
                " is negative, not an ncclComm_t");
  DEEP_EP_CHECK(comm_address >= kFirstMappableAddress, "adopting an NCCL communicator: the address ", comm_address,
                " lies in the never-mapped first page, not an ncclComm_t");
  DEEP_EP_CHECK(comm_address % static_cast<std::int64_t>(alignof(void*)) == 0,
                "adopting an NCCL communicator: the address ", comm_address, " is not aligned to ", alignof(void*),
                " bytes, not an ncclComm_t");
  return reinterpret_cast<ncclComm_t>(static_cast<std::uintptr_t>(comm_address));
}

void check_comm_matches_group(int comm_num_ranks, int comm_rank, int group_size, int group_rank) {
  DEEP_EP_CHECK(comm_num_ranks == group_size && comm_rank == group_rank,
                "the adopted NCCL communicator is not the group: it has ", comm_num_ranks,
                " ranks and this process is its rank ", comm_rank, ", while the group has ", group_size,
                " ranks and this process is its rank ", group_rank,
                " (pass the communicator of the same process group, in the same rank order)");
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, bool owns_comm, int rank, int num_ranks)
    : comm_(comm), owns_comm_(owns_comm), rank_(rank), num_ranks_(num_ranks) {}

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Group& group) {
  check_nccl_version_compatible(NCCL_VERSION_CODE, runtime_nccl_version());
  const ncclUniqueId id = exchange_unique_id(group, [] {
    ncclUniqueId made;
    DEEP_EP_NCCL_CHECK(ncclGetUniqueId(&made), nullptr);
    return made;
  });
  std::unique_ptr<NcclCommunicator> communicator(new NcclCommunicator(nullptr, true, group.rank(), group.size()));
  try {
    DEEP_EP_NCCL_CHECK(ncclCommInitRank(&communicator->comm_, group.size(), id, group.rank()), nullptr);
  } catch (const NcclError& e) {
    throw NcclError(detail::concat(e.what(), " (rank ", group.rank(), " of ", group.size(), ", CUDA device ",
                                   current_cuda_device_or_minus_one(), ")"),
                    e.result());
  }
  return communicator;
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::adopt(std::int64_t comm_address, const Group& group) {
  const ncclComm_t comm = comm_from_address(comm_address);
  check_nccl_version_compatible(NCCL_VERSION_CODE, runtime_nccl_version());
  int comm_num_ranks = 0, comm_rank = 0, comm_device = 0;
  DEEP_EP_NCCL_CHECK(ncclCommCount(comm, &comm_num_ranks), comm);
  DEEP_EP_NCCL_CHECK(ncclCommUserRank(comm, &comm_rank), comm);
  DEEP_EP_NCCL_CHECK(ncclCommCuDevice(comm, &comm_device), comm);
  check_comm_matches_group(comm_num_ranks, comm_rank, group.size(), group.rank());
  const int current_device = current_cuda_device_or_minus_one();
  DEEP_EP_CHECK(comm_device == current_device, "the adopted NCCL communicator of rank ", comm_rank,
                " runs on CUDA device ", comm_device, " but the current CUDA device is ", current_device,
                " (set the device the communicator was created for before creating the buffer)");
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(comm, false, comm_rank, comm_num_ranks));
}

NcclCommunicator::~NcclCommunicator() {
  for (auto window = windows_.rbegin(); window != windows_.rend(); ++window)
    report_if_failed("ncclCommWindowDeregister", ncclCommWindowDeregister(comm_, *window), comm_, __LINE__);
  if (has_dev_comm_) report_if_failed("ncclDevCommDestroy", ncclDevCommDestroy(comm_, &dev_comm_), comm_, __LINE__);
  // After ncclCommDestroy the communicator is gone: ask for NCCL's process-wide last error instead.
  if (owns_comm_ && comm_ != nullptr) report_if_failed("ncclCommDestroy", ncclCommDestroy(comm_), nullptr, __LINE__);
}

void NcclCommunicator::create_device_comm(int num_gin_signals, int num_gin_contexts) {
  DEEP_EP_CHECK(!has_dev_comm_, "create_device_comm: this communicator has a device communicator already");
  DEEP_EP_CHECK(num_gin_signals >= 0 && num_gin_contexts >= 0,
                "create_device_comm: num_gin_signals and num_gin_contexts must be non-negative, got ", num_gin_signals,
                " and ", num_gin_contexts);
#if defined(NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER)
  ncclDevCommRequirements requirements = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  // NCCL 2.28 has no initializer macro; all zeros (no lists, barriers or GIN resources) is its empty request.
  ncclDevCommRequirements requirements{};
#endif
  const bool wants_gin = num_gin_signals > 0 || num_gin_contexts > 0;
  requirements.ginSignalCount = num_gin_signals;
  requirements.ginContextCount = num_gin_contexts;
  // Signals alone already make 2.28 connect GIN; contexts alone would not.
  requirements.ginForceEnable = wants_gin;
  try {
    DEEP_EP_NCCL_CHECK(ncclDevCommCreate(comm_, &requirements, &dev_comm_), comm_);
  } catch (const NcclError& e) {
    dev_comm_ = ncclDevComm{};
    if (!wants_gin) throw;
    throw NcclError(detail::concat(e.what(), " (asked for ", num_gin_signals, " GIN signals and ", num_gin_contexts,
                                   " GIN contexts; NCCL fails this way when a rank has no GIN-capable network)"),
                    e.result());
  }
  has_dev_comm_ = true;
  if (dev_comm_reports_gin(dev_comm_)) {
    DEEP_EP_RUNTIME_CHECK(dev_comm_.ginSignalCount >= num_gin_signals, "ncclDevCommCreate gave ",
                          dev_comm_.ginSignalCount, " GIN signals where ", num_gin_signals, " were asked for");
  }
}

const ncclDevComm& NcclCommunicator::device_comm() const {
  DEEP_EP_CHECK(has_dev_comm_, "device_comm: call create_device_comm first");
  return dev_comm_;
}

ncclWindow_t NcclCommunicator::register_window(void* ptr, std::size_t num_bytes) {
  DEEP_EP_CHECK(ptr != nullptr && num_bytes > 0, "register_window: needs a non-empty range, got ", num_bytes,
                " bytes at ", reinterpret_cast<std::uintptr_t>(ptr));
  DEEP_EP_CHECK(reinterpret_cast<std::uintptr_t>(ptr) % NCCL_WIN_REQUIRED_ALIGNMENT == 0, "register_window: address ",
                reinterpret_cast<std::uintptr_t>(ptr), " is not aligned to NCCL_WIN_REQUIRED_ALIGNMENT (",
                NCCL_WIN_REQUIRED_ALIGNMENT, " bytes)");
  windows_.reserve(windows_.size() + 1);
  ncclWindow_t window = nullptr;
  DEEP_EP_NCCL_CHECK(ncclCommWindowRegister(comm_, ptr, num_bytes, &window, NCCL_WIN_COLL_SYMMETRIC), comm_);
  // NCCL 2.28 returns success and no window where the communicator lacks symmetric-memory support.
  DEEP_EP_RUNTIME_CHECK(window != nullptr, "ncclCommWindowRegister returned no window for ", num_bytes,
                        " bytes: the NCCL communicator has no symmetric-memory support (NCCL's CUDA VMM path is "
                        "off, e.g. NCCL_CUMEM_ENABLE=0, or the driver lacks it)");
  windows_.push_back(window);
  return window;
}

void* NcclCommunicator::allocate_window_memory(std::size_t num_bytes) {
  DEEP_EP_CHECK(num_bytes > 0, "allocate_window_memory: num_bytes must be positive");
  void* ptr = nullptr;
  DEEP_EP_NCCL_CHECK(ncclMemAlloc(&ptr, num_bytes), nullptr);
  return ptr;
}

void NcclCommunicator::free_window_memory(void* ptr) noexcept {
  if (ptr != nullptr) report_if_failed("ncclMemFree", ncclMemFree(ptr), nullptr, __LINE__);
}

void fill_nccl_transport_inputs(const NcclCommunicator* communicator, TransportChoiceInputs& inputs) {
  inputs.nccl_available = communicator != nullptr;
  inputs.nccl_reports_gin = communicator != nullptr && communicator->gin_supported();
}

}  // namespace deep_ep
