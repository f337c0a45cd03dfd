"""Backend choice: order per device, forcing, and errors that give every reason."""
import pytest
import torch

from fastmlm.ops import BackendUnavailable, gather_rows, use_backend
from fastmlm.ops.dispatch import DEVICE_ORDER, TABLES, Backend, BackendTable


@pytest.fixture(autouse=True)
def _forget_test_tables():
    yield
    TABLES.pop("test_family_for_dispatch", None)


def _table():
    table = BackendTable("test_family_for_dispatch")
    table.register(Backend("cpu", lambda d, x: None if d == "cpu" else "cpu only", lambda x: "cpu"))
    table.register(Backend("triton", lambda d, x: None, lambda x: "triton"))
    table.register(Backend("torch", lambda d, x: None, lambda x: "torch"))
    return table


def test_order_per_device_and_triton_never_automatic_on_cpu():
    table = _table()
    assert table.choose("cpu", None).name == "cpu"
    assert table.choose("cuda", None).name == "triton"
    assert "triton" not in DEVICE_ORDER["cpu"]


def test_forcing_by_context_and_environment(monkeypatch):
    table = _table()
    with use_backend("torch"):
        assert table.choose("cpu", None).name == "torch"
    with use_backend("torch", "gather_rows"):  # another family: this one keeps its order
        assert table.choose("cpu", None).name == "cpu"
    monkeypatch.setenv("FASTMLM_BACKEND", "test_family_for_dispatch=torch")
    assert table.choose("cuda", None).name == "torch"
    monkeypatch.setenv("FASTMLM_BACKEND", "sdpa")  # a backend this family lacks: ignored here
    assert table.choose("cpu", None).name == "cpu"
    # A family's own entry wins over a bare name, in either order.
    for value in ("cpu,test_family_for_dispatch=torch", "test_family_for_dispatch=torch,cpu"):
        monkeypatch.setenv("FASTMLM_BACKEND", value)
        assert table.choose("cuda", None).name == "torch", value
    monkeypatch.setenv("FASTMLM_BACKEND", "torch,gather_rows=cpu")
    assert table.choose("cuda", None).name == "torch"
    monkeypatch.setenv("FASTMLM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        table.choose("cpu", None)
    monkeypatch.setenv("FASTMLM_BACKEND", "gather_rows=bogus")  # another family's typo is still an error
    with pytest.raises(ValueError, match="unknown backend"):
        table.choose("cpu", None)


def test_forced_backend_that_cannot_serve_lists_every_reason():
    table = _table()
    with use_backend("cpu"):
        with pytest.raises(BackendUnavailable) as info:
            table.choose("cuda", None)
    message = str(info.value)
    assert "forced backend 'cpu'" in message and "cpu only" in message
    assert "triton: can serve" in message and "torch: can serve" in message


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("fastest"):
            pass


def test_unknown_family_is_rejected_not_ignored(monkeypatch):
    # A misspelt family would otherwise leave the default backend in place without a word.
    with pytest.raises(ValueError, match="unknown op family 'cross_entropy'.*mlm_cross_entropy"):
        with use_backend("triton", "cross_entropy"):
            pass
    monkeypatch.setenv("FASTMLM_BACKEND", "cross_entropy=torch")
    with pytest.raises(ValueError, match="unknown op family 'cross_entropy'"):
        _table().choose("cpu", None)


def test_real_op_forced_to_unavailable_backend_raises_before_running():
    x = torch.randn(4, 3)
    with use_backend("cuda", "gather_rows"), pytest.raises(BackendUnavailable, match="serves cuda tensors"):
        gather_rows(x, torch.tensor([0, 1]))


def test_every_family_has_a_reference_backend():
    import fastmlm.ops  # noqa: F401

    for family in ("attention", "gather_rows", "mask_tokens", "masked_positions", "mlm_cross_entropy"):
        assert "torch" in TABLES[family].backends, family


def test_info_report_names_every_family():
    from fastmlm.info import report

    text = report()
    for family in ("attention", "gather_rows", "mask_tokens", "masked_positions", "mlm_cross_entropy"):
        assert f"{family}" in text
    assert "fastmlm._C" in text


def test_triton_attention_declines_more_sequences_than_its_grid_holds():
    # One sequence per grid row, and CUDA's grid y holds 65535: past that the op must fall
    # back to another backend, not fail to launch.
    from fastmlm.ops.attention import ATTENTION, MAX_TRITON_SEQUENCES

    # The interpreter serves CPU tensors; on a GPU machine the check is the real one.
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.zeros(1, 1, 16)
    for sequences, declined in ((MAX_TRITON_SEQUENCES, False), (MAX_TRITON_SEQUENCES + 1, True)):
        cu = torch.zeros(sequences + 1, dtype=torch.int32)
        cu[-1] = 1
        reason = ATTENTION.backends["triton"].why_not(DEVICE, q, q, q, cu, cu, 1, 1, False, 0.25, 0.0, torch.tensor(0))
        assert (reason is not None and "grid" in reason) == declined, reason


# ---------------------------------------------------------------------------
# The compiled CUDA kernels are refused where they cannot launch, so the op
# falls back instead of failing: a GPU none of the built architectures runs on
# (a T4 with the default sm_80/sm_90 build) or a driver older than the runtime.

@pytest.mark.parametrize("entry, capability, runs", [
    ("80-real", (8, 0), True), ("80-real", (8, 6), True), ("80-real", (8, 9), True),
    ("80-real", (9, 0), False), ("80-real", (7, 5), False),
    ("90", (9, 0), True), ("90", (10, 0), True), ("90", (12, 0), True), ("90", (8, 9), False),
    ("90-virtual", (12, 1), True), ("90-real", (10, 0), False),
    ("90a", (9, 0), True), ("90a-real", (9, 0), True), ("90a", (10, 0), False),
    ("100f", (10, 3), True), ("100f", (12, 0), False), ("120", (10, 0), False),
    ("native", (9, 0), None), ("all-major", (9, 0), None),
])
def test_architecture_runs(entry, capability, runs):
    from fastmlm import _ext

    assert _ext.architecture_runs(entry, capability) is runs


@pytest.fixture
def cuda_build(monkeypatch):
    """fastmlm._C as if built with CUDA kernels for `archs` on a machine whose torch sees a GPU."""
    from fastmlm import _ext

    # "image": what loading the code on a device index gives (an exception is raised).
    state = {"archs": ("80-real", "90"), "count": 1, "capability": (9, 0), "image": {}}

    def device_count():
        if isinstance(state["count"], Exception):
            raise state["count"]
        return state["count"]

    def kernel_image(device):
        image = state["image"].get(device, (90, 90))
        if isinstance(image, Exception):
            raise image
        return image

    module = type("C", (), {"cross_entropy_chunk_forward": None, "cuda_kernel_image": staticmethod(kernel_image)})
    monkeypatch.setattr(_ext, "load_error", lambda: None)
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_ext, "module", lambda: module)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_ext, "cuda_device_count", device_count)
    monkeypatch.setattr(_ext, "cuda_architectures", lambda: state["archs"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # With is_available() True, torch 2.11's FakeTensor allocates a real tensor on each
    # device a fake CUDA tensor names (2.13 only on the current accelerator): without a
    # driver, or at cuda:1 on a one-GPU machine, that fails. The tests' fake tensors need no GPU.
    from torch._subclasses import fake_tensor

    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)

    def capability(device=None):  # a dict gives each device index its own
        if isinstance(state["capability"], dict):
            return state["capability"][0 if device is None else torch.device(device).index]
        return state["capability"]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    _ext._cuda_runtime_reason.cache_clear()
    _ext._kernel_image_reason.cache_clear()
    yield state
    _ext._cuda_runtime_reason.cache_clear()
    _ext._kernel_image_reason.cache_clear()


def test_cuda_kernels_refused_on_a_gpu_no_built_architecture_runs_on(cuda_build):
    from fastmlm import _ext
    from fastmlm.ops.gather import GATHER_ROWS

    rows = torch.empty(8, 4, device="meta")
    index = torch.empty(2, dtype=torch.int64, device="meta")
    assert _ext.unavailable_reason("cuda") is None
    assert GATHER_ROWS.choose("cuda", rows, index).name == "cuda"
    cuda_build["capability"] = (7, 5)
    reason = _ext.unavailable_reason("cuda")
    assert "80-real, 90" in reason and "7.5" in reason and "FASTMLM_CUDA_ARCHS=7.5" in reason
    assert GATHER_ROWS.choose("cuda", rows, index).name == "torch"
    assert "7.5" in GATHER_ROWS.reasons("cuda", rows, index)["cuda"]
    cuda_build["capability"] = (8, 6)  # sm_80 machine code runs on every 8.x
    assert _ext.unavailable_reason("cuda") is None
    cuda_build["archs"] = ()  # a module that does not record them: the launch will say
    cuda_build["capability"] = (7, 5)
    assert _ext.unavailable_reason("cuda") is None


def test_the_gpu_judged_is_the_one_the_tensors_are_on(cuda_build):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmlm import _ext
    from fastmlm.ops.gather import GATHER_ROWS

    cuda_build["capability"] = {0: (7, 5), 1: (9, 0)}  # a T4 (current) next to an H100
    with FakeTensorMode():  # CUDA tensors without a GPU; only their device is read
        on_t4 = (torch.empty(8, 4, device="cuda:0"), torch.empty(2, dtype=torch.int64, device="cuda:0"))
        on_h100 = (torch.empty(8, 4, device="cuda:1"), torch.empty(2, dtype=torch.int64, device="cuda:1"))
    assert GATHER_ROWS.choose("cuda", *on_h100).name == "cuda"
    assert GATHER_ROWS.choose("cuda", *on_t4).name == "torch"
    _ext.require(on_h100[0].device)  # the adapters' own check agrees with the dispatcher's
    with pytest.raises(RuntimeError, match="7.5"):
        _ext.require(on_t4[0].device)
    # The cross-entropy adapter's check, too (it asked about the current GPU).
    from fastmlm.kernels.compiled import cross_entropy

    with FakeTensorMode():
        hidden, weight = torch.empty(3, 8, device="cuda:1"), torch.empty(20, 8, device="cuda:1")
        targets = torch.zeros(3, dtype=torch.int64, device="cuda:1")
    cross_entropy._check_common(hidden, weight, None, targets, 0.0, None)


@pytest.mark.parametrize("count, message", [
    (RuntimeError("CUDA error 35 (cudaErrorInsufficientDriver)"), "cudaErrorInsufficientDriver"),
    (0, "sees no GPU"),
])
def test_cuda_kernels_refused_when_their_runtime_cannot_use_the_driver(cuda_build, count, message):
    from fastmlm import _ext
    from fastmlm.ops.masking import MASKED_POSITIONS

    cuda_build["count"] = count
    assert message in _ext.unavailable_reason("cuda")
    labels = torch.empty(2, 8, dtype=torch.int64, device="meta")
    assert MASKED_POSITIONS.reasons("cuda", labels, -100, None)["cuda"] == _ext.unavailable_reason("cuda")


def test_cuda_kernels_refused_on_a_gpu_their_code_does_not_load_on(cuda_build):
    # The architectures say yes, but the driver cannot JIT the build's PTX for
    # the second GPU: that GPU falls back, the first keeps the kernels.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmlm import _ext
    from fastmlm.ops.gather import GATHER_ROWS

    cuda_build["image"] = {1: RuntimeError("CUDA error 222 (cudaErrorUnsupportedPtxVersion)")}
    with FakeTensorMode():
        on = {i: (torch.empty(8, 4, device=f"cuda:{i}"), torch.empty(2, dtype=torch.int64, device=f"cuda:{i}"))
              for i in (0, 1)}
    assert GATHER_ROWS.choose("cuda", *on[0]).name == "cuda"
    assert GATHER_ROWS.choose("cuda", *on[1]).name == "torch"
    reason = GATHER_ROWS.reasons("cuda", *on[1])["cuda"]
    assert "cuda:1" in reason and "cudaErrorUnsupportedPtxVersion" in reason
    assert _ext.unavailable_reason("cuda") is None  # None: the current GPU, index 0
    with pytest.raises(RuntimeError, match="cudaErrorUnsupportedPtxVersion"):
        _ext.require(torch.device("cuda:1"))


def test_the_built_module_records_its_cuda_architectures():
    from fastmlm import _ext

    if _ext.load_error() is not None or not _ext.has_cuda_kernels():
        pytest.skip(f"fastmlm._C without CUDA kernels: {_ext.unavailable_reason('cuda')}")
    architectures = _ext.cuda_architectures()
    assert architectures, "a CUDA build must record CUDA_ARCHITECTURES"
    assert all(_ext.architecture_runs(entry, (9, 0)) is not None for entry in architectures), architectures


def test_cuda_kernels_refused_on_a_machine_without_a_usable_gpu():
    from fastmlm import _ext

    if _ext.load_error() is not None or not _ext.has_cuda_kernels() or torch.cuda.is_available():
        pytest.skip("needs fastmlm._C with CUDA kernels on a machine without a GPU")
    assert _ext.unavailable_reason("cuda") is not None  # the runtime reports no driver or no device
    with pytest.raises(RuntimeError, match="CUDA error"):
        _ext.kernel_image(0)  # loading the code fails with the runtime's error, not a crash
