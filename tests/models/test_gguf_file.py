"""models.gguf_file reads what the gguf package's reader reads (metadata values, tensor table, tensor bytes)."""
import numpy as np
import pytest

from models.gguf_file import GGUFFile
from models.registry import bundled_path

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def path():
    try:
        return bundled_path("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - the weights package may be absent
        pytest.skip(f"bundled smollm2-135m not available: {e}")


def test_same_fields_and_tensors_as_the_gguf_package(path):
    mine, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert mine.fields.keys() == ref.fields.keys()
    for key, field in ref.fields.items():
        assert mine.fields[key] == field.contents(), key
    assert len(mine.fields["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(mine.tensors, ref.tensors):
        assert t.shape == tuple(int(x) for x in r.shape) and t.tensor_type == r.tensor_type, t.name
        assert t.data.shape == r.data.shape and t.data.dtype == r.data.dtype, t.name
        np.testing.assert_array_equal(t.data, np.asarray(r.data), err_msg=t.name)


def test_cut_or_foreign_files_are_refused(path, tmp_path):
    raw = open(path, "rb").read(1 << 20)  # the header and the first tensors only
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw)
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(str(cut))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + raw[4:64])
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(other))
