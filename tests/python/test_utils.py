"""deep_ep.utils, the module DeepEP V1 clients import (`from deep_ep.utils import EventHandle, EventOverlap`):
what it exports, EventHandle and EventOverlap over stand-in streams, every op accepting
EventOverlap(EventHandle()) as previous_event, and check_nvlink_connections over a stand-in NVML.

The first tests need neither torch nor a GPU; the others need torch (CPU is enough) and skip without it.
"""

import ast
import copy
import importlib.util
import pathlib
import sys
import types

import pytest


def _package_dir():
    spec = importlib.util.find_spec("deep_ep")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the deep_ep package is not installed")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


# ---- without torch ----------------------------------------------------------------------------------------------
def test_event_handle_is_exported_next_to_event_overlap():
    pytest.importorskip("deep_ep._C")
    import deep_ep

    assert {"EventHandle", "EventOverlap", "Buffer"} <= set(deep_ep.__all__)


def test_utils_without_torch_raises_an_import_error_naming_torch():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: deep_ep.utils imports")
    pytest.importorskip("deep_ep._C")
    import deep_ep  # the package itself still imports

    assert not hasattr(deep_ep, "EventHandle")
    sys.modules.pop("deep_ep.utils", None)
    with pytest.raises(ImportError, match="PyTorch"):
        import deep_ep.utils  # noqa: F401


def test_event_module_takes_its_classes_from_utils():
    """deep_ep.event re-exports deep_ep.utils' classes instead of defining its own (read as source)."""
    package = _package_dir()
    event_tree = ast.parse((package / "event.py").read_text())
    defined = {node.name for node in event_tree.body if isinstance(node, ast.ClassDef)}
    imported = {
        alias.name
        for node in event_tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "utils"
        for alias in node.names
    }
    assert not defined and {"EventHandle", "EventOverlap"} <= imported
    utils_tree = ast.parse((package / "utils.py").read_text())
    names = {node.name for node in utils_tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert {"EventHandle", "EventOverlap", "check_nvlink_connections"} <= names


# ---- with torch: events over stand-in streams -------------------------------------------------------------------
class _FakeEvent:
    def __init__(self, stream):
        self.stream = stream
        self.waited_by = []

    def wait(self, stream=None):
        self.waited_by.append(stream)

    def query(self):
        return True


class _FakeStream:
    def __init__(self, name):
        self.name, self.cuda_stream = name, hash(name) & 0xFFFF
        self.recorded, self.waited = [], []

    def record_event(self):
        event = _FakeEvent(self)
        self.recorded.append(event)
        return event

    def wait_event(self, event):
        self.waited.append(event)

    def wait_stream(self, other):
        self.waited.append(other)


@pytest.fixture
def utils(monkeypatch):
    """deep_ep.utils with torch.cuda's current stream replaced by a stand-in (`utils.current`), and _FakeEvent
    counted as a torch event."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deep_ep._C")
    import deep_ep.utils as module

    current = _FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(module, "_event_types", lambda: (_FakeEvent,))
    monkeypatch.setattr(module, "current", current, raising=False)
    return module


def test_event_handle_records_on_the_current_stream_or_the_given_one(utils):
    handle = utils.EventHandle()
    assert utils.current.recorded == [handle.event]
    side = _FakeStream("side")
    on_side = utils.EventHandle(side)
    assert side.recorded == [on_side.event] and on_side.event.stream is side
    on_side.current_stream_wait()
    assert utils.current.waited == [on_side.event]
    with pytest.raises(TypeError, match="torch.cuda.Stream"):
        utils.EventHandle(3)


def test_event_handle_answers_like_the_torch_event_it_holds(utils):
    """Code written when `.event` was a torch.cuda.Event keeps working: torch's Stream.wait_event(e) calls
    e.wait(stream)."""
    handle = utils.EventHandle()
    side = _FakeStream("side")
    handle.wait(side)
    assert handle.event.waited_by == [side] and handle.query() is True


def test_event_handle_copies_share_the_event(utils):
    handle = utils.EventHandle()
    for copied in (copy.copy(handle), copy.deepcopy(handle), copy.deepcopy([handle])[0]):
        assert isinstance(copied, utils.EventHandle) and copied is not handle and copied.event is handle.event
    assert len(utils.current.recorded) == 1  # copying records nothing


def test_event_overlap_wraps_a_handle_or_a_bare_event(utils):
    handle = utils.EventHandle()
    tensors = [object(), object()]
    overlap = utils.EventOverlap(handle, extra_tensors=tensors)
    assert overlap.event is handle and overlap.extra_tensors == tuple(tensors)
    bare = _FakeEvent(utils.current)
    wrapped = utils.EventOverlap(bare)
    assert isinstance(wrapped.event, utils.EventHandle) and wrapped.event.event is bare
    assert utils.EventOverlap().event is None and utils.EventOverlap().extra_tensors is None
    with pytest.raises(TypeError, match="EventHandle"):
        utils.EventOverlap("not an event")


def test_event_overlap_waits_when_leaving_a_with_block_only(utils):
    overlap = utils.EventOverlap(utils.EventHandle())
    with overlap as entered:
        assert entered is overlap and utils.current.waited == []
    assert utils.current.waited == [overlap.event.event]
    overlap.current_stream_wait()
    assert utils.current.waited == [overlap.event.event] * 2
    utils.EventOverlap(None).current_stream_wait()  # nothing to wait for
    with utils.EventOverlap(None):
        pass
    assert len(utils.current.waited) == 2


def test_one_class_under_every_name(utils):
    import deep_ep
    import deep_ep.event

    assert deep_ep.EventOverlap is deep_ep.event.EventOverlap is utils.EventOverlap
    assert deep_ep.EventHandle is deep_ep.event.EventHandle is utils.EventHandle


# ---- with torch: ops take EventOverlap(EventHandle()) ----------------------------------------------------------
class _LayoutRuntime:
    def check_device_errors(self):
        pass

    def num_nodes(self):
        return 1

    def get_dispatch_layout(self, topk_idx, num_experts, per_rank, per_rdma_rank, per_expert, in_rank, stream):
        pass


@pytest.fixture
def layout_buffer(utils, monkeypatch):
    torch = pytest.importorskip("torch")
    import contextlib

    from deep_ep.buffer import Buffer

    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None, raising=False)
    buffer = object.__new__(Buffer)
    buffer.low_latency_mode, buffer.group_size, buffer.rank = False, 2, 0
    buffer._device, buffer._comm_stream = torch.device("cpu"), _FakeStream("comm")
    buffer.runtime = _LayoutRuntime()
    return torch, buffer


def test_previous_event_may_be_built_from_an_event_handle(utils, layout_buffer):
    torch, buffer = layout_buffer
    topk_idx = torch.zeros(4, 2, dtype=torch.int64)
    previous = utils.EventOverlap(utils.EventHandle())
    *_, event = buffer.get_dispatch_layout(
        topk_idx, 4, previous_event=previous, async_finish=True, allocate_on_comm_stream=True
    )
    # The comm stream waits on the torch event inside the handle, not on the current stream.
    assert buffer._comm_stream.waited == [previous.event.event]
    assert isinstance(event.event, utils.EventHandle) and event.event.event in buffer._comm_stream.recorded
    assert event.extra_tensors

    captured = buffer.capture()
    assert isinstance(captured, utils.EventOverlap) and isinstance(captured.event, utils.EventHandle)
    buffer.get_dispatch_layout(topk_idx, 4, previous_event=captured)
    assert buffer._comm_stream.waited[-1] is captured.event.event
    buffer.get_dispatch_layout(topk_idx, 4, previous_event=utils.EventOverlap(_FakeEvent(utils.current)))
    assert isinstance(buffer._comm_stream.waited[-1], _FakeEvent)

    # Without an event the comm stream waits on the current stream; sync ops return no event.
    *_, event = buffer.get_dispatch_layout(topk_idx, 4, previous_event=utils.EventOverlap(None))
    assert buffer._comm_stream.waited[-1] is utils.current and event.event is None


def test_previous_event_must_be_an_event_overlap(utils, layout_buffer):
    torch, buffer = layout_buffer
    topk_idx = torch.zeros(4, 2, dtype=torch.int64)
    for wrong in (utils.EventHandle(), _FakeEvent(utils.current), "event"):
        with pytest.raises(TypeError, match="previous_event must be a deep_ep.EventOverlap"):
            buffer.get_dispatch_layout(topk_idx, 4, previous_event=wrong)


# ---- with torch: check_nvlink_connections ----------------------------------------------------------------------
def _fake_pynvml(nvlinked_pairs):
    calls = []
    nvml = types.SimpleNamespace(NVML_P2P_CAPS_INDEX_NVLINK=7, NVML_P2P_STATUS_OK=0, calls=calls)
    nvml.nvmlInit = lambda: calls.append("init")
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlDeviceGetHandleByIndex = lambda index: ("index", index)
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: ("uuid", uuid)

    def p2p_status(first, second, capability):
        assert capability == 7
        calls.append((first, second))
        return 0 if frozenset((str(first[1]), str(second[1]))) in nvlinked_pairs else 4

    nvml.nvmlDeviceGetP2PStatus = p2p_status
    return nvml


@pytest.fixture
def nvlink(utils, monkeypatch):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    state = {"name": "NVIDIA A100-PCIE-40GB", "everyone": None}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: state["name"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(state["everyone"]))

    def all_gather_object(out, obj, group=None):
        state["mine"] = obj
        out[:] = state["everyone"]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(utils.socket, "gethostname", lambda: "host-a")
    return state


def test_nvlink_check_is_a_no_op_on_sxm_parts(utils, nvlink, monkeypatch):
    nvlink["name"] = "NVIDIA H100 80GB HBM3"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # would fail if it were imported
    utils.check_nvlink_connections(group=None)
    assert "mine" not in nvlink


def test_nvlink_check_checks_each_pair_of_distinct_gpus_once(utils, nvlink, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    # Three ranks, two of them on GPU 5; a rank on another host is not paired with these.
    nvlink["everyone"] = [("host-a", "3"), ("host-a", "5"), ("host-a", "5"), ("host-b", "0")]
    nvml = _fake_pynvml({frozenset(("3", "5"))})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    utils.check_nvlink_connections(group=None)
    assert nvlink["mine"] == ("host-a", "5")  # CUDA device 1 is physical GPU 5
    assert nvml.calls == ["init", (("index", 3), ("index", 5)), "shutdown"]


def test_nvlink_check_names_the_gpus_without_nvlink(utils, nvlink, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")
    nvlink["name"] = "NVIDIA H100 PCIe"
    nvlink["everyone"] = [("host-a", "GPU-aaa"), ("host-a", "GPU-bbb")]
    nvml = _fake_pynvml(set())
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(AssertionError, match="GPU GPU-aaa and GPU GPU-bbb on host-a are not connected by NVLink"):
        utils.check_nvlink_connections(group=None)
    assert nvml.calls[-1] == "shutdown"


def test_nvlink_check_asks_for_pynvml_on_pcie_parts(utils, nvlink, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvlink["everyone"] = [("host-a", "0"), ("host-a", "1")]
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(ImportError, match="nvidia-ml-py"):
        utils.check_nvlink_connections(group=None)
    assert nvlink["mine"] == ("host-a", "1")
