"""engine.AlrState: one dtype each (weights float32, keep bool), and the on-disk alr_state.safetensors of
every earlier run folder stays readable (and is written byte for byte as before)."""
import base64

import pytest
import torch

from trpr import engine
from trpr.engine.state_files import load_state, save_state

# last/training_state/alr_state.safetensors as trpr 91d3db0 (before AlrState) wrote it: its
# checkpoint.training_snapshot + state_files.save_state of {"weights": result.weights, "keep": flags.bool()}
HEAD_WEIGHTS = [1.0, 0.75, 0.5, 1.0, 0.125, 1.0, 0.999, 0.25]
HEAD_KEEP = [True, True, False, True, False, True, True, True]
HEAD_FILE = base64.b64decode(
    "2AAAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJ0cnByLnN0YXRlIjoie1wid2VpZ2h0c1wiOiB7XCIkdGVuc29yXCI6IFwidDBcIn0sIFwia2VlcF"
    "wiOiB7XCIkdGVuc29yXCI6IFwidDFcIn19In0sInQwIjp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOls4XSwiZGF0YV9vZmZzZXRzIjpbMCwzMl19"
    "LCJ0MSI6eyJkdHlwZSI6IkJPT0wiLCJzaGFwZSI6WzhdLCJkYXRhX29mZnNldHMiOlszMiw0MF19fSAAAIA/AABAPwAAAD8AAIA/AAAAPgAAgD"
    "93vn8/AACAPgEBAAEAAQEB")


def test_a_file_written_before_alr_state_loads_and_is_written_identically(tmp_path):
    path = tmp_path / "alr_state.safetensors"
    path.write_bytes(HEAD_FILE)
    state = engine.AlrState.load(path)
    assert state.weights.dtype == torch.float32 and state.keep.dtype == torch.bool
    assert state.weights.tolist() == pytest.approx(HEAD_WEIGHTS) and state.keep.tolist() == HEAD_KEEP
    again = tmp_path / "again.safetensors"
    state.save(again)
    assert again.read_bytes() == HEAD_FILE  # the same format, byte for byte
    loaded = load_state(again)  # what older readers (ablation_report, tests) index
    assert list(loaded) == ["weights", "keep"] and loaded["keep"].dtype == torch.bool


def test_one_dtype_each_and_rows():
    state = engine.AlrState.initial(5, "cpu")
    assert state.weights.dtype == torch.float32 and state.keep.dtype == torch.bool and len(state) == 5
    assert state.weights.tolist() == [1.0] * 5 and state.keep.all()
    state = engine.AlrState(torch.tensor([1.0, 0.5, 0.25]), torch.tensor([True, False, True]))
    weights, keep = state.rows(torch.tensor([2, 1]))
    assert weights.tolist() == [0.25, 0.5] and keep.tolist() == [True, False] and keep.dtype == torch.bool
    with pytest.raises(ValueError, match="keep bool"):
        engine.AlrState(torch.ones(3), torch.ones(3))  # a float keep flag is refused, not converted
    with pytest.raises(ValueError, match="float32"):
        engine.AlrState(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one length"):
        engine.AlrState(torch.ones(3), torch.ones(4, dtype=torch.bool))


def test_snapshot_is_a_host_copy():
    state = engine.AlrState.initial(4, "cpu")
    copy = state.host_copy()
    state.weights[0], state.keep[1] = 0.5, False
    assert copy.weights[0] == 1.0 and bool(copy.keep[1])


@pytest.mark.parametrize("content, message", [
    ({"weights": torch.ones(3)}, "tensors weights and keep"),
    ({"weights": torch.ones(3, dtype=torch.long), "keep": torch.ones(3, dtype=torch.bool)}, "dtype torch.int64"),
    ({"weights": torch.ones(3), "keep": torch.ones(3)}, "keep bool"),
])
def test_a_foreign_state_is_refused(tmp_path, content, message):
    path = tmp_path / "alr_state.safetensors"
    save_state(content, path)
    with pytest.raises(ValueError, match=message):
        engine.AlrState.load(path)
