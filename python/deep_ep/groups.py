"""Adapters from the caller's process group to the core's bootstrap Group (docs/design.md decision 2):
torch.distributed groups of any backend (gloo included) and mpi4py communicators."""

from . import _C


def _torch_group(group) -> "_C.Group":
    import torch.distributed as dist

    rank = dist.get_rank(group)
    size = dist.get_world_size(group)

    def all_gather(data: bytes):
        parts = [None] * size
        dist.all_gather_object(parts, bytes(data), group=group)
        return [bytes(p) for p in parts]

    def barrier():
        dist.barrier(group=group)

    return _C.CallbackGroup(rank, size, all_gather, barrier)


def _mpi_group(comm) -> "_C.Group":
    def all_gather(data: bytes):
        return [bytes(p) for p in comm.allgather(bytes(data))]

    return _C.CallbackGroup(comm.Get_rank(), comm.Get_size(), all_gather, comm.Barrier)


def make_group(group=None, comm=None) -> "_C.Group":
    """A core Group from a torch.distributed ProcessGroup (`group`) or an mpi4py communicator (`comm`)."""
    if isinstance(group, _C.Group):
        return group
    if group is not None:
        return _torch_group(group)
    if comm is not None:
        return _mpi_group(comm)
    raise ValueError(
        "Buffer needs a torch.distributed ProcessGroup as `group`, or an mpi4py communicator as `comm`; both were None"
    )


def nccl_comm_address(group) -> int:
    """The address of the ncclComm_t behind `group` when it is a torch ProcessGroupNCCL whose communicator
    exists, else 0 (then deep_ep creates its own communicator where it needs one). The Buffer asks only when
    a peer is on another host, in builds with the GIN transport."""
    if group is None or isinstance(group, _C.Group):
        return 0
    try:
        import torch

        backend = group._get_backend(torch.device("cuda"))
        comm_ptr = getattr(backend, "_comm_ptr", None)
        return int(comm_ptr()) if comm_ptr is not None else 0
    except (AttributeError, RuntimeError, ValueError):
        # Not NCCL-backed (gloo raises when asked for a CUDA backend it lacks), or torch made no
        # communicator yet: create one.
        return 0
