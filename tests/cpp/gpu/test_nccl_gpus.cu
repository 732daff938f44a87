// The NCCL communicator (csrc/runtime/nccl_comm.hpp) on real GPUs, one process per GPU as the Buffer
// runs it: created over a Group it carries a collective; its device communicator reports GIN
// consistently, and asking for GIN where the network has none is an NcclError, not a hang; a symmetric
// window on ncclMemAlloc memory is written by the peer through NCCL's peer pointer. GIN builds only;
// every test is skipped where fewer than two GPUs are visible (CI has none).
//
// The gtest process never touches CUDA (a forked child of a CUDA process cannot use CUDA): the GPU
// count and every rank run in forked children, which report failures through a pipe.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../host/temp_dir.hpp"
#include "deep_ep/group.hpp"
#include "runtime/nccl_comm.hpp"

using namespace deep_ep;

namespace {

constexpr int kNumRanks = 2;
constexpr int kRankTimeoutS = 120;

// A failed check inside a rank: the message travels to the gtest process.
void require(bool condition, const std::string& message) {
  if (!condition) throw std::runtime_error(message);
}

void require_cuda(cudaError_t result, const char* what) {
  require(result == cudaSuccess, std::string(what) + ": " + cudaGetErrorString(result));
}

// Reads everything from fd until EOF (the writer exited) or `deadline`.
std::string read_all(int fd, std::chrono::steady_clock::time_point deadline) {
  std::string text;
  char chunk[512];
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, 100) <= 0) continue;
    const ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n <= 0) break;
    text.append(chunk, static_cast<size_t>(n));
  }
  return text;
}

// Runs fn in a forked child; returns what it wrote to its pipe and whether it exited 0. The child is
// killed after timeout_s.
struct ChildResult {
  bool ok;
  std::string output;
};
ChildResult run_child(const std::function<std::string()>& fn, int timeout_s) {
  int fds[2];
  if (pipe(fds) != 0) return {false, "pipe failed"};
  const pid_t pid = fork();
  if (pid < 0) return {false, "fork failed"};
  if (pid == 0) {
    close(fds[0]);
    int code = 0;
    std::string out;
    try {
      out = fn();
    } catch (const std::exception& e) {
      out = e.what();
      code = 1;
    }
    (void)!write(fds[1], out.data(), out.size());
    close(fds[1]);
    _exit(code);
  }
  close(fds[1]);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  std::string output = read_all(fds[0], deadline);
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return {false, output + " (killed after " + std::to_string(timeout_s) + " s)"};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return {WIFEXITED(status) && WEXITSTATUS(status) == 0, output};
}

int visible_gpu_count() {
  const ChildResult r = run_child(
      [] {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
        return std::to_string(count);
      },
      60);
  return r.ok ? std::atoi(r.output.c_str()) : 0;
}

// body(rank, group) in kNumRanks children at once, rank r on GPU r with a FileGroup over a fresh
// directory. Returns "" when every rank passed, else each failing rank's message.
std::string run_ranks(const std::function<void(int, Group&)>& body) {
  const std::string dir = fresh_test_dir("deep_ep_nccl_gpus_");
  std::vector<ChildResult> results(kNumRanks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kNumRanks; ++rank) {
    threads.emplace_back([&, rank] {
      results[rank] = run_child(
          [&, rank] {
            require_cuda(cudaSetDevice(rank), "cudaSetDevice");
            FileGroup group(dir, rank, kNumRanks);
            body(rank, group);
            return std::string();
          },
          kRankTimeoutS);
    });
  }
  for (auto& t : threads) t.join();
  std::string failures;
  for (int rank = 0; rank < kNumRanks; ++rank)
    if (!results[rank].ok) failures += "rank " + std::to_string(rank) + ": " + results[rank].output + "\n";
  return failures;
}

#define SKIP_WITHOUT_TWO_GPUS()                                                                     \
  do {                                                                                              \
    static const int gpus = visible_gpu_count();                                                    \
    if (gpus < kNumRanks) GTEST_SKIP() << "needs " << kNumRanks << " GPUs, " << gpus << " visible"; \
  } while (0)

// Every thread writes word i of the peer's window with a value naming the writer and i.
__global__ void write_peer_window(ncclWindow_t window, int peer, int writer, int num_words) {
  auto* words = static_cast<int*>(ncclGetPeerPointer(window, 0, peer));
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_words; i += gridDim.x * blockDim.x)
    words[i] = writer * 1000003 + i;
}

}  // namespace

TEST(NcclOnGpus, CreatedCommunicatorCarriesAnAllReduce) {
  SKIP_WITHOUT_TWO_GPUS();
  const std::string failures = run_ranks([](int rank, Group& group) {
    auto comm = NcclCommunicator::create(group);
    require(comm->rank() == rank && comm->num_ranks() == kNumRanks && comm->owns_comm(),
            "the communicator is not the group's");
    int* value = nullptr;
    require_cuda(cudaMalloc(&value, sizeof(int)), "cudaMalloc");
    const int mine = 10 + rank;
    require_cuda(cudaMemcpy(value, &mine, sizeof(int), cudaMemcpyHostToDevice), "cudaMemcpy");
    require(ncclAllReduce(value, value, 1, ncclInt32, ncclSum, comm->comm(), nullptr) == ncclSuccess,
            "ncclAllReduce failed");
    int sum = 0;
    require_cuda(cudaMemcpy(&sum, value, sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy back");
    require_cuda(cudaFree(value), "cudaFree");
    require(sum == 10 * kNumRanks + kNumRanks * (kNumRanks - 1) / 2, "all-reduce sum " + std::to_string(sum));
  });
  EXPECT_EQ(failures, "");
}

TEST(NcclOnGpus, DeviceCommunicatorReportsGinConsistently) {
  SKIP_WITHOUT_TWO_GPUS();
  const std::string failures = run_ranks([](int, Group& group) {
    auto comm = NcclCommunicator::create(group);
    require(!comm->gin_supported() && !comm->has_device_comm(), "GIN reported before the device communicator");
    comm->create_device_comm(0, 0);
    require(comm->has_device_comm(), "no device communicator");
    require(comm->gin_supported() == (comm->num_gin_contexts() > 0), "GIN report and context count disagree");
    require(comm->device_comm().nRanks == kNumRanks, "device communicator of the wrong size");
  });
  EXPECT_EQ(failures, "");
}

// Where the network has GIN, the contexts come; where it has none (no NIC), NCCL refuses and the
// refusal is an NcclError naming the call, on every rank, and no rank hangs.
TEST(NcclOnGpus, AskingForGinGivesContextsOrAClearError) {
  SKIP_WITHOUT_TWO_GPUS();
  const std::string failures = run_ranks([](int rank, Group& group) {
    auto comm = NcclCommunicator::create(group);
    try {
      comm->create_device_comm(4, 1);
    } catch (const NcclError& e) {
      require(std::string(e.what()).find("ncclDevCommCreate") != std::string::npos,
              std::string("the error does not name the call: ") + e.what());
      std::printf("rank %d: no GIN here: %s\n", rank, e.what());
      std::fflush(stdout);
      return;
    }
    require(comm->gin_supported() && comm->num_gin_contexts() > 0, "GIN asked for, granted, but no contexts");
    std::printf("rank %d: GIN with %d contexts\n", rank, comm->num_gin_contexts());
    std::fflush(stdout);
  });
  EXPECT_EQ(failures, "");
}

TEST(NcclOnGpus, SymmetricWindowIsWrittenByThePeer) {
  SKIP_WITHOUT_TWO_GPUS();
  const std::string failures = run_ranks([](int rank, Group& group) {
    constexpr int kWords = 1 << 18;  // 1 MiB
    auto comm = NcclCommunicator::create(group);
    void* memory = NcclCommunicator::allocate_window_memory(kWords * sizeof(int));
    require_cuda(cudaMemset(memory, 0xff, kWords * sizeof(int)), "cudaMemset");
    require_cuda(cudaDeviceSynchronize(), "sync after memset");
    ncclWindow_t window = comm->register_window(memory, kWords * sizeof(int));
    require(window != nullptr, "no window");
    group.barrier();  // every window is cleared before any peer writes
    const int peer = (rank + 1) % kNumRanks;
    write_peer_window<<<64, 256>>>(window, peer, rank, kWords);
    require_cuda(cudaGetLastError(), "launch");
    require_cuda(cudaDeviceSynchronize(), "sync after the peer writes");
    group.barrier();  // every peer's writes are complete
    std::vector<int> words(kWords);
    require_cuda(cudaMemcpy(words.data(), memory, kWords * sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy");
    const int writer = (rank + kNumRanks - 1) % kNumRanks;
    for (int i = 0; i < kWords; ++i)
      require(words[i] == writer * 1000003 + i, "word " + std::to_string(i) + " is " + std::to_string(words[i]) +
                                                    ", expected from rank " + std::to_string(writer));
    group.barrier();  // no peer still reads this window when it goes
    comm.reset();     // deregisters the window
    NcclCommunicator::free_window_memory(memory);
  });
  EXPECT_EQ(failures, "");
}
