// The ops' kernel launches over the Buffer's transport (transport_launch.hpp).
#include "runtime/transport_launch.hpp"

#include <cstddef>
#include <memory>

#include "deep_ep/error.hpp"
#include "util/cuda_check.hpp"

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
#include <nccl.h>
#include <nccl_device.h>

#include "kernels/internode/internode_gin.cuh"
#include "kernels/low_latency/low_latency_gin.cuh"
#include "runtime/nccl_comm.hpp"
#endif

namespace deep_ep::transport_launch {

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN

namespace {

// The op's transport: the window over the whole buffer, offset 0 at `base_offset`, signals from
// `signal_start`; context 0 for every op, so a signal's adders and its owner post on the same one.
transport::GinTransport transport_at(const Buffer::Internals& in, int64_t base_offset, int signal_start,
                                     int num_signals, int signal_capacity, const char* op) {
  DEEP_EP_RUNTIME_CHECK(in.gin_window && in.nccl && in.nccl->has_device_comm() && !in.nccl->windows().empty(), op,
                        ": the buffer is not an NCCL window with a device communicator");
  DEEP_EP_RUNTIME_CHECK(num_signals <= signal_capacity, op, " needs ", num_signals, " GIN signals, its range holds ",
                        signal_capacity);
  transport::GinTransport t{};
  t.dev_comm = in.nccl->device_comm();
  t.window = in.nccl->windows().front();
  t.base_offset = base_offset;
  t.context_idx = 0;
  t.signal_start = static_cast<uint32_t>(signal_start);
  return t;
}

transport::GinTransport internode_transport(const Buffer::Internals& in, const internode::Peers& peers,
                                            const internode::Layout& layout, const char* op) {
  return transport_at(in, peers.rdma_offset, in.gin_signals.internode_start, layout.num_signals(),
                      in.gin_signals.internode_count, op);
}

transport::GinTransport low_latency_transport(const Buffer::Internals& in, const low_latency::Peers& peers,
                                              const low_latency::HalfLayout& layout, const char* op) {
  return transport_at(in, peers.half_offset, in.gin_signals.low_latency_start[peers.half], layout.num_signals(),
                      in.gin_signals.low_latency_count, op);
}

// A temporary device allocation of `count` T that cudaFree releases when it leaves scope, on every path out of
// it (a failed CUDA check that throws included). The success path frees explicitly, so that a failing cudaFree
// is reported there; the deleter cannot report it and only keeps error paths from leaking.
struct CudaFreeDeleter {
  void operator()(void* ptr) const noexcept { cudaFree(ptr); }
};
template <typename T>
using DeviceTemp = std::unique_ptr<T, CudaFreeDeleter>;

template <typename T>
DeviceTemp<T> device_temp(size_t count) {
  void* ptr = nullptr;
  DEEP_EP_CUDA_CHECK(cudaMalloc(&ptr, sizeof(T) * count));
  return DeviceTemp<T>(static_cast<T*>(ptr));
}

template <typename T>
void free_device_temp(DeviceTemp<T>& temp) {
  DEEP_EP_CUDA_CHECK(cudaFree(temp.release()));
}

__global__ void peer_pointers_kernel(ncclWindow_t window, const bool* reachable, int num_ranks, char** out) {
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x)
    out[r] = reachable[r] ? static_cast<char*>(ncclGetPeerPointer(window, 0, r)) : nullptr;
}

}  // namespace

std::vector<char*> register_buffer(Buffer::Internals& in, int rank, int num_ranks) {
  DEEP_EP_RUNTIME_CHECK(in.nccl != nullptr, "registering the buffer as an NCCL window needs the communicator");
  const ncclWindow_t window = in.nccl->register_window(in.local_base, static_cast<size_t>(in.total_bytes));
  const ncclComm_t comm = in.nccl->comm();
  const ncclTeam_t lsa = ncclTeamLsa(comm), world = ncclTeamWorld(comm);
  std::vector<char> reachable(num_ranks);  // not vector<bool>: copied to the device as bytes
  for (int r = 0; r < num_ranks; ++r) reachable[r] = r != rank && ncclTeamRankIsMember(lsa, world, r);

  const auto count = static_cast<size_t>(num_ranks);
  DeviceTemp<bool> reachable_device = device_temp<bool>(count);
  DeviceTemp<char*> out_device = device_temp<char*>(count);
  DEEP_EP_CUDA_CHECK(cudaMemcpy(reachable_device.get(), reachable.data(), count, cudaMemcpyHostToDevice));
  peer_pointers_kernel<<<1, 256>>>(window, reachable_device.get(), num_ranks, out_device.get());
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
  std::vector<char*> bases(count);
  DEEP_EP_CUDA_CHECK(cudaMemcpy(bases.data(), out_device.get(), sizeof(char*) * count, cudaMemcpyDeviceToHost));
  free_device_temp(reachable_device);
  free_device_temp(out_device);
  bases[rank] = in.local_base;
  return bases;
}

#endif  // DEEP_EP_ENABLE_GIN

void internode_notify(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                      const internode::NotifyArgs& args, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (in.uses_gin()) {
    internode::launch_notify(peers, layout, args, internode_transport(in, peers, layout, "internode notify"), stream);
    return;
  }
#endif
  internode::launch_notify(peers, layout, args, stream);
}

void internode_cached_notify(const Buffer::Internals& in, const internode::Peers& peers,
                             const internode::Layout& layout, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (in.uses_gin()) {
    internode::launch_cached_notify(peers, layout, internode_transport(in, peers, layout, "internode cached notify"),
                                    stream);
    return;
  }
#endif
  internode::launch_cached_notify(peers, layout, stream);
}

void internode_dispatch(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                        const internode::DispatchArgs& args, const LaunchShape& shape, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (in.uses_gin()) {
    const auto gin = internode_transport(in, peers, layout, "internode dispatch");
    internode::launch_dispatch(peers, layout, args, gin, shape, stream);
    return;
  }
#endif
  internode::launch_dispatch(peers, layout, args, shape, stream);
}

void internode_combine(const Buffer::Internals& in, const internode::Peers& peers, const internode::Layout& layout,
                       const internode::CombineArgs& args, const LaunchShape& shape, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (in.uses_gin()) {
    internode::launch_combine(peers, layout, args, internode_transport(in, peers, layout, "internode combine"), shape,
                              stream);
    return;
  }
#endif
  internode::launch_combine(peers, layout, args, shape, stream);
}

void low_latency_dispatch(const Buffer::Internals& in, const low_latency::Peers& peers,
                          const low_latency::HalfLayout& layout, const low_latency::DispatchArgs& args,
                          const LaunchShape& shape, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (in.uses_gin()) {
    const auto gin = low_latency_transport(in, peers, layout, "low_latency_dispatch");
    low_latency::launch_dispatch(peers, layout, args, gin, shape, stream);
    return;
  }
#endif
  low_latency::launch_dispatch(peers, layout, args, shape, stream);
}

void low_latency_combine(const Buffer::Internals& in, const low_latency::Peers& peers,
                         const low_latency::HalfLayout& layout, const low_latency::CombineArgs& args,
                         const LaunchShape& shape, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (in.uses_gin()) {
    const auto gin = low_latency_transport(in, peers, layout, "low_latency_combine");
    low_latency::launch_combine(peers, layout, args, gin, shape, stream);
    return;
  }
#endif
  low_latency::launch_combine(peers, layout, args, shape, stream);
}

void reset_low_latency_transport_signals(const Buffer::Internals& in, cudaStream_t stream) {
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
  if (!in.uses_gin()) return;
  for (int half = 0; half < 2; ++half) {
    // The signal range of a half does not depend on where the half is: offset 0 will do.
    const auto gin = transport_at(in, 0, in.gin_signals.low_latency_start[half], in.gin_signals.low_latency_count,
                                  in.gin_signals.low_latency_count, "clean_low_latency_buffer");
    low_latency::launch_reset_signals(gin, in.gin_signals.low_latency_count, stream);
  }
#else
  (void)in;
  (void)stream;
#endif
}

}  // namespace deep_ep::transport_launch
