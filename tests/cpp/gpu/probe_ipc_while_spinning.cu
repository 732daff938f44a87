// Probe, not a test: what the host-free pull combine relies on, measured on the machine at hand.
//  1. Does cudaIpcOpenMemHandle (from a second host thread) return while this process has a kernel
//     spinning on the GPU, or does it wait for the kernel?
//  2. Can that already-running kernel read the memory mapped after it started?
//  3. Do cudaIpcGetMemHandle / cudaMalloc / a kernel launch in the exporting process return while one of
//     its kernels spins?
// Two processes (fork before any CUDA call): the exporter allocates and exports, the importer spins a kernel
// on a host-mapped flag, opens the handle from another thread, then publishes the mapped address to the
// kernel. Every wait is bounded (10 s) so nothing hangs. Prints one line per measurement.
//
// Build and run: nvcc -O2 -arch=sm_90 -o probe tests/cpp/gpu/probe_ipc_while_spinning.cu && ./probe
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace {

constexpr size_t kBytes = 64 << 20;
constexpr uint64_t kSpinLimitNs = 10'000'000'000ull;

#define CHECK(call)                                                                                   \
  do {                                                                                                \
    cudaError_t status_ = (call);                                                                     \
    if (status_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

__device__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Host-mapped control block shared by the importer's threads and its kernel.
struct Control {
  volatile int started;  // kernel -> host: the kernel is running
  volatile int go;       // host -> kernel: `address` holds the mapped pointer (or 0: give up)
  volatile uint64_t address;
  volatile int timed_out;  // kernel -> host
  volatile uint32_t sum;   // kernel -> host: sum of the first 256 words read through `address`
};

// One thread: say it started, wait for `go`, then read through the published address.
__global__ void spin_then_read(Control* control) {
  control->started = 1;
  __threadfence_system();
  const uint64_t start = global_ns();
  while (control->go == 0) {
    if (global_ns() - start > kSpinLimitNs) {
      control->timed_out = 1;
      return;
    }
  }
  const uint32_t* words = reinterpret_cast<const uint32_t*>(control->address);
  if (!words) return;
  uint32_t sum = 0;
  for (int i = 0; i < 256; ++i) sum += words[i * 1024];
  control->sum = sum;
}

// Exporter side: spin on a host-mapped flag with a bounded wait.
__global__ void spin_on(volatile int* flag) {
  const uint64_t start = global_ns();
  while (*flag == 0 && global_ns() - start < kSpinLimitNs) {
  }
}

__global__ void noop() {}

// A zeroed host-mapped T and its device address, and a non-blocking stream: what each side spins a kernel with.
template <typename T>
T* mapped_host(T** device, cudaStream_t* stream) {
  T* host = nullptr;
  CHECK(cudaHostAlloc(&host, sizeof(T), cudaHostAllocMapped));
  *host = T{};
  CHECK(cudaHostGetDevicePointer(device, host, 0));
  CHECK(cudaStreamCreateWithFlags(stream, cudaStreamNonBlocking));
  return host;
}

void write_all(int fd, const void* data, size_t bytes) {
  if (write(fd, data, bytes) != static_cast<ssize_t>(bytes)) std::exit(2);
}
void read_all(int fd, void* data, size_t bytes) {
  if (read(fd, data, bytes) != static_cast<ssize_t>(bytes)) std::exit(2);
}

int run_exporter(int to_importer, int from_importer) {
  CHECK(cudaSetDevice(0));
  char* memory = nullptr;
  CHECK(cudaMalloc(&memory, kBytes));
  CHECK(cudaMemset(memory, 0x01, kBytes));  // every word 0x01010101
  CHECK(cudaDeviceSynchronize());

  // 3. Host calls while one of this process's kernels spins.
  int* flag_device = nullptr;
  cudaStream_t stream;
  int* flag = mapped_host(&flag_device, &stream);
  spin_on<<<1, 1, 0, stream>>>(flag_device);
  CHECK(cudaGetLastError());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));

  char* fresh = nullptr;
  auto t = std::chrono::steady_clock::now();
  CHECK(cudaMalloc(&fresh, 32 << 20));
  std::printf("exporter: cudaMalloc(32 MiB) while a kernel spins: %.6f s\n", seconds_since(t));
  cudaIpcMemHandle_t handle;
  t = std::chrono::steady_clock::now();
  CHECK(cudaIpcGetMemHandle(&handle, memory));
  std::printf("exporter: cudaIpcGetMemHandle while a kernel spins: %.6f s\n", seconds_since(t));
  cudaIpcMemHandle_t fresh_handle;
  t = std::chrono::steady_clock::now();
  CHECK(cudaIpcGetMemHandle(&fresh_handle, fresh));
  std::printf("exporter: cudaIpcGetMemHandle (new allocation) while a kernel spins: %.6f s\n", seconds_since(t));
  cudaStream_t other;
  CHECK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  t = std::chrono::steady_clock::now();
  noop<<<1, 1, 0, other>>>();
  CHECK(cudaGetLastError());
  std::printf("exporter: kernel launch on another stream while a kernel spins: %.6f s\n", seconds_since(t));
  cudaError_t query = cudaStreamQuery(stream);
  std::printf("exporter: the spinning kernel was %s when those calls returned\n",
              query == cudaErrorNotReady ? "still running" : "finished");
  *flag = 1;
  CHECK(cudaDeviceSynchronize());

  write_all(to_importer, &handle, sizeof(handle));
  char done = 0;
  read_all(from_importer, &done, 1);  // keep the allocation alive until the importer is finished
  CHECK(cudaFree(fresh));
  CHECK(cudaFree(memory));
  return 0;
}

int run_importer(int from_exporter, int to_exporter) {
  CHECK(cudaSetDevice(0));
  Control* control_device = nullptr;
  cudaStream_t stream;
  Control* control = mapped_host(&control_device, &stream);
  spin_then_read<<<1, 1, 0, stream>>>(control_device);
  CHECK(cudaGetLastError());
  const auto wait_start = std::chrono::steady_clock::now();
  while (!control->started && seconds_since(wait_start) < 10) {
  }
  std::printf("importer: kernel %s\n", control->started ? "running" : "did not start within 10 s");

  cudaIpcMemHandle_t handle;
  read_all(from_exporter, &handle, sizeof(handle));

  // 1. Open from a second thread while the kernel spins; the main thread meanwhile launches on another stream.
  std::atomic<int> open_done{0};
  double open_s = -1;
  void* mapped = nullptr;
  cudaError_t open_status = cudaSuccess;
  std::thread mapper([&] {
    cudaSetDevice(0);
    const auto t = std::chrono::steady_clock::now();
    open_status = cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess);
    open_s = seconds_since(t);
    open_done.store(1);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
  cudaStream_t other;
  CHECK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  auto t = std::chrono::steady_clock::now();
  noop<<<1, 1, 0, other>>>();
  const double launch_s = seconds_since(t);
  // Give the open up to 3 s while the kernel still spins; then release the kernel either way.
  const auto open_wait = std::chrono::steady_clock::now();
  while (!open_done.load() && seconds_since(open_wait) < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const bool returned_while_spinning = open_done.load() != 0;
  std::printf("importer: main-thread launch during the open: %.6f s\n", launch_s);
  std::printf("importer: cudaIpcOpenMemHandle %s while the kernel spun (%.6f s, %s)\n",
              returned_while_spinning ? "returned" : "DID NOT return within 3 s", open_s,
              cudaGetErrorString(open_status));
  control->address = returned_while_spinning && open_status == cudaSuccess ? reinterpret_cast<uint64_t>(mapped) : 0;
  std::atomic_thread_fence(std::memory_order_release);
  control->go = 1;
  mapper.join();
  const cudaError_t sync = cudaStreamSynchronize(stream);
  std::printf("importer: kernel finished: %s; timed_out=%d; sum=0x%08x (expected 0x%08x)\n", cudaGetErrorString(sync),
              control->timed_out, control->sum, 256u * 0x01010101u);
  const bool ok = sync == cudaSuccess && returned_while_spinning && control->sum == 256u * 0x01010101u;
  std::printf("RESULT probe_ipc_while_spinning %s\n", ok ? "PASS" : "FAIL");
  char done = 1;
  write_all(to_exporter, &done, 1);
  if (mapped) cudaIpcCloseMemHandle(mapped);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  int exporter_to_importer[2], importer_to_exporter[2];
  if (pipe(exporter_to_importer) != 0 || pipe(importer_to_exporter) != 0) return 2;
  const pid_t child = fork();
  if (child == 0) return run_exporter(exporter_to_importer[1], importer_to_exporter[0]);
  const int rc = run_importer(exporter_to_importer[0], importer_to_exporter[1]);
  int status = 0;
  waitpid(child, &status, 0);
  return rc != 0 ? rc : (WIFEXITED(status) ? WEXITSTATUS(status) : 3);
}
