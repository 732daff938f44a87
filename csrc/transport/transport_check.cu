// Compile-time check of the transport contract (transport.cuh): one kernel body that names every
// operation, instantiated for each transport this build has, so that a transport drifting from the
// contract breaks the library build rather than the first internode kernel. Nothing launches these
// kernels and they have internal linkage: the library exports no symbol from this file.
#include "transport/gin_transport.cuh"
#include "transport/transport.cuh"

namespace deep_ep::transport {
namespace {

struct CheckArgs {
  int peer;
  int64_t dst_offset, src_offset, num_bytes;
  int signal_idx;
  uint64_t value, target;
  int64_t timeout_ns;
  const int* abort_flag;
  uint64_t* out;  // keeps the results alive so the compiler checks the whole body
};

template <typename Transport>
__global__ void exercise_transport(Transport transport, CheckArgs args) {
  transport.put(args.peer, args.dst_offset, args.src_offset, args.num_bytes);
  transport.put_with_signal(args.peer, args.dst_offset, args.src_offset, args.num_bytes, args.signal_idx, args.value);
  transport.signal_add(args.peer, args.signal_idx, args.value);
  transport.flush();
  if ((threadIdx.x & 31) == 0) {
    uint64_t observed = 0;
    const bool reached =
        transport.wait_signal(args.signal_idx, args.target, args.timeout_ns, args.abort_flag, &observed);
    args.out[0] = reached ? observed : ~observed;
    args.out[3] = transport.read_signal(args.signal_idx);
    transport.reset_signal(args.signal_idx);
    args.out[1] = reinterpret_cast<uintptr_t>(transport.local_ptr(args.dst_offset));
    args.out[2] = reinterpret_cast<uintptr_t>(transport.direct_ptr(args.peer, args.dst_offset));
  }
}

template __global__ void exercise_transport<P2pTransport>(P2pTransport, CheckArgs);
#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
template __global__ void exercise_transport<GinTransport>(GinTransport, CheckArgs);
#endif

}  // namespace
}  // namespace deep_ep::transport
