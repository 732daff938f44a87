"""Adapters from the caller's process group to the core's bootstrap Group (design.md decision 2):
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
    raise ValueError("Buffer needs a torch.distributed ProcessGroup as `group`, or an mpi4py communicator as `comm`; "
                     "both were None")
