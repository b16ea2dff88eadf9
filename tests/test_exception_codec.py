"""The exception codec shared by the shared-memory slots and Ray."""

import pickle
import subprocess
import sys

import pytest

from batchserve import _core
from batchserve.transports.exception_codec import decode_exception, encode_exception


class ModuleLevelError(Exception):
    """Defined in this module: unpickles wherever the module imports."""


class TwoArgumentError(Exception):
    """Pickles, but its __init__ needs two arguments: it does not unpickle."""

    def __init__(self, code, detail):
        super().__init__(f"error {code}: {detail}")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle Unpicklable")


def round_trip(exc, limit=None):
    data = encode_exception(exc, limit)
    assert isinstance(data, bytes)
    if limit is not None:
        assert len(data) <= limit
    return decode_exception(data)


def test_a_builtin_keeps_its_type_and_message():
    back = round_trip(ValueError("boom: the model failed"), _core.SLOT_ERROR_BYTES)
    assert type(back) is ValueError and str(back) == "boom: the model failed"
    back = round_trip(KeyError("id"))
    assert type(back) is KeyError and back.args == ("id",)


def test_a_class_of_a_test_module_keeps_its_type():
    back = round_trip(ModuleLevelError("custom"), _core.SLOT_ERROR_BYTES)
    assert type(back) is ModuleLevelError and str(back) == "custom"


def test_one_that_does_not_unpickle_arrives_as_its_text():
    back = round_trip(TwoArgumentError(503, "the backend fell over"), _core.SLOT_ERROR_BYTES)
    assert type(back) is RuntimeError
    assert str(back) == "the server raised TwoArgumentError: error 503: the backend fell over"


def test_one_that_does_not_pickle_arrives_as_its_text():
    back = round_trip(Unpicklable("no way through"))
    assert type(back) is RuntimeError
    assert str(back) == "the server raised Unpicklable: no way through"


def test_a_message_larger_than_the_limit_arrives_cut_at_a_character():
    message = "€" * _core.SLOT_ERROR_BYTES  # 3 bytes a character
    back = round_trip(ValueError(message), _core.SLOT_ERROR_BYTES)
    assert type(back) is RuntimeError
    text = str(back)
    assert text.startswith("the server raised ValueError: €€€")
    assert "\ufffd" not in text  # no character cut in half
    assert len(text.encode()) < _core.SLOT_ERROR_BYTES
    # Without a limit it travels whole.
    back = round_trip(ValueError(message))
    assert type(back) is ValueError and str(back) == message


def test_bytes_of_another_format_decode_to_a_runtime_error():
    assert type(decode_exception(b"")) is RuntimeError
    assert type(decode_exception(pickle.dumps(ValueError("x")))) is RuntimeError


def test_a_class_of_the_servers_main_keeps_its_type_in_another_process():
    # cloudpickle carries a __main__ class by value: the decoding process
    # (another interpreter, without that class) rebuilds it.
    encoder = (
        "import sys\n"
        "from batchserve.transports.exception_codec import encode_exception\n"
        "class MainOnlyError(Exception):\n"
        "    pass\n"
        "sys.stdout.buffer.write(encode_exception(MainOnlyError('from main')))\n"
    )
    data = subprocess.run([sys.executable, "-c", encoder], capture_output=True, check=True,
                          timeout=120).stdout
    pytest.importorskip("cloudpickle")
    back = decode_exception(data)
    assert type(back).__name__ == "MainOnlyError" and str(back) == "from main"
