"""How deep_ep.Buffer finds the NCCL communicator it may adopt for the GIN transport: the ncclComm_t address
behind a torch ProcessGroupNCCL, and 0 (create one) for any other group or a communicator torch has not
made yet. Needs torch (CPU is enough) and the built extension."""

import os
import tempfile

import pytest

torch = pytest.importorskip("torch")
groups = pytest.importorskip("deep_ep.groups")


class _Backend:
    def __init__(self, address=None, error=None):
        self.address, self.error = address, error

    def _comm_ptr(self):
        if self.error is not None:
            raise self.error
        return self.address


class _Group:
    """Stands in for a ProcessGroup: _get_backend(cuda) gives `backend` or raises `error`."""

    def __init__(self, backend=None, error=None):
        self.backend, self.error = backend, error
        self.asked = []

    def _get_backend(self, device):
        self.asked.append(device)
        if self.error is not None:
            raise self.error
        return self.backend


def test_nccl_backed_group_gives_its_communicator_address():
    group = _Group(_Backend(address=0x7F00DEAD1000))
    assert groups.nccl_comm_address(group) == 0x7F00DEAD1000
    assert [d.type for d in group.asked] == ["cuda"]


def test_backend_without_a_communicator_gives_zero():
    assert groups.nccl_comm_address(_Group(object())) == 0  # no _comm_ptr (not NCCL)
    assert groups.nccl_comm_address(_Group(error=RuntimeError("no cuda backend"))) == 0
    assert groups.nccl_comm_address(_Group(_Backend(error=RuntimeError("not initialized")))) == 0
    assert groups.nccl_comm_address(None) == 0


def test_core_group_is_not_asked():
    # A core Group (C++ users, tests) carries no torch backend.
    assert groups.nccl_comm_address(groups._C.CallbackGroup(0, 1, lambda b: [b], lambda: None)) == 0


def test_real_gloo_group_gives_zero():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            assert groups.nccl_comm_address(dist.group.WORLD) == 0
        finally:
            dist.destroy_process_group()
