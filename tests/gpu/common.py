"""Helpers shared by the GPU tests: bootstrap, random routing, tensor <-> reference conversions."""

import faulthandler
import gc
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import torch

import deep_ep
from deep_ep.testing import destroy_process_group, init_process_group


def setup(ctx, seed_base=0):
    """Join the gloo group, select the GPU, seed torch per rank; returns the WORLD group."""
    group = init_process_group(ctx)
    torch.manual_seed(seed_base * 1000 + ctx.rank + 1)
    return group


def teardown():
    destroy_process_group()


# Buffer.set_num_sms is class-level: what a case sets must not reach the next case of a rank process.
_DEFAULT_NUM_SMS = deep_ep.Buffer.num_sms


def between_cases(ctx):
    """Run by run_all.py on every rank after each case that returned (deep_ep.testing.RankPool's between_runs):
    leave the group a case left joined, undo class-level settings, and hand the case's cached memory back to the
    GPU, whose other ranks' next case may need it. The environment is restored by the pool itself."""
    destroy_process_group()
    deep_ep.Buffer.num_sms = _DEFAULT_NUM_SMS
    gc.collect()  # Buffers a case dropped without destroy() release their memory now
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def random_topk_idx(num_tokens, num_experts, num_topk, drop_prob=0.1, device="cuda"):
    """Distinct experts per token, with some slots set to -1."""
    if num_tokens == 0:
        return torch.empty((0, num_topk), dtype=torch.int64, device=device)
    scores = torch.rand(num_tokens, num_experts, device=device)
    idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    drop = torch.rand(num_tokens, num_topk, device=device) < drop_prob
    idx[drop] = -1
    return idx.contiguous()


def to_numpy(t):
    """A CUDA or CPU tensor as a flat numpy array of its raw values (bf16 as uint16 bits, fp8/bool as uint8)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    if t.dtype in (torch.float8_e4m3fn, torch.bool):
        return t.view(torch.uint8).numpy().reshape(-1)
    return t.numpy().reshape(-1)


def gather_numpy(group, value):
    """Every rank's `value` (a numpy array, or a dict or tuple holding them, ints and None), in rank order, over the
    gloo group. Only the structure is pickled; the arrays' bytes travel in one uint8 tensor per rank (pickle's
    out-of-band buffers, each at a 64-byte aligned offset). A gather of 14 MB per rank over 8 CPU processes takes
    about half the time of all_gather_object, which pickles and copies the rows themselves."""
    import pickle

    import torch.distributed as dist

    def offsets(sizes):
        starts = [0] * len(sizes)
        for i in range(1, len(sizes)):
            starts[i] = (starts[i - 1] + sizes[i - 1] + 63) // 64 * 64
        return starts, (starts[-1] + sizes[-1] if sizes else 0)

    buffers = []
    skeleton = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raw = [np.frombuffer(memoryview(b.raw()).cast("B"), dtype=np.uint8) for b in buffers]
    world = dist.get_world_size(group)
    skeletons = [None] * world
    dist.all_gather_object(skeletons, (skeleton, [r.size for r in raw]), group=group)
    longest = max(offsets(sizes)[1] for _, sizes in skeletons)
    blobs = [np.empty(0, dtype=np.uint8)] * world
    if longest > 0:
        mine = np.zeros(longest, dtype=np.uint8)
        for start, r in zip(offsets([r.size for r in raw])[0], raw):
            mine[start : start + r.size] = r
        gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(gathered, torch.from_numpy(mine), group=group)
        blobs = [t.numpy() for t in gathered]
    out = []
    for (rank_skeleton, sizes), blob in zip(skeletons, blobs):
        pieces = [blob[start : start + size] for start, size in zip(offsets(sizes)[0], sizes)]
        out.append(pickle.loads(rank_skeleton, buffers=pieces))
    return out


def assert_equal(name, got, expected):
    got = np.asarray(got)
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got.shape} != expected {expected.shape}")
    if not np.array_equal(got, expected):
        bad = np.flatnonzero(got.reshape(-1) != expected.reshape(-1))
        raise AssertionError(
            f"{name}: {bad.size} of {got.size} elements differ; first at {bad[0]}: "
            f"got {got.reshape(-1)[bad[0]]}, expected {expected.reshape(-1)[bad[0]]}"
        )


def expect_raises(exc_type, fragment, fn):
    try:
        fn()
    except exc_type as error:
        if fragment not in str(error):
            raise AssertionError(f"expected {exc_type.__name__} mentioning {fragment!r}, got: {error}")
        return
    raise AssertionError(f"expected {exc_type.__name__} mentioning {fragment!r}, nothing was raised")


class StallWatchdog:
    """Prints this rank's stacks (Python, and native ones through gdb where it is installed) when the block it
    guards runs longer than `seconds`: a rank stuck on its host shows where, before the device timeout of the
    ranks waiting for it ends the case."""

    def __init__(self, label, seconds):
        self.label, self.seconds = label, seconds

    def __enter__(self):
        self._done = threading.Event()
        faulthandler.dump_traceback_later(self.seconds, exit=False)
        gdb = shutil.which("gdb")

        def native_stacks():
            if self._done.wait(self.seconds) or gdb is None:
                return
            result = subprocess.run(
                [gdb, "-batch", "-p", str(os.getpid()), "-ex", "thread apply all bt 12"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            print(f"{self.label}: native stacks after {self.seconds} s\n{result.stdout[-6000:]}", file=sys.stderr)

        threading.Thread(target=native_stacks, daemon=True).start()
        return self

    def __exit__(self, *exc):
        faulthandler.cancel_dump_traceback_later()
        self._done.set()
        return False


def free_device_memory(group):
    """This GPU's free memory once every rank's queued work is done (mem_get_info counts every process on it)."""
    torch.cuda.synchronize()
    torch.distributed.barrier(group)
    return torch.cuda.mem_get_info()[0]


def check_freed_inputs_returned(group, ctx, before, input_bytes, num_rounds):
    """After rounds of combine inputs freed with the cache emptied (input exports retired, peers' mappings closed),
    the GPU's free memory must be back to within two inputs per rank of `before`: each rank's last input is still
    allocated, and as much again is allowed. Fails on every rank when any rank's GPU holds more."""
    allowed = before - 2 * ctx.num_ranks * input_bytes
    after = free_device_memory(group)
    held_ok = torch.tensor([1 if after >= allowed else 0], dtype=torch.int32)
    torch.distributed.all_reduce(held_ok, op=torch.distributed.ReduceOp.MIN, group=group)
    assert held_ok.item() == 1, (
        f"rank {ctx.rank}: {(before - after) / 2**20:.0f} MiB of device memory still held after {num_rounds} rounds "
        f"of freed {input_bytes >> 20} MiB combine inputs (allowed {2 * ctx.num_ranks * input_bytes >> 20} MiB; "
        f"some rank's GPU held more)"
    )
