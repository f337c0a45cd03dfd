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
    monkeypatch.setenv("FASTMLM_BACKEND", "bogus")
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
