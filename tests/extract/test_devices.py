"""--device (extract/devices.py): every command resolves it here, so a device this machine lacks is
one DeviceError line (a usage error, exit code 2), never a torch traceback."""
import pytest
import torch

from cache.errors import UserError
from extract.devices import DeviceError, check_device, resolve_device


@pytest.mark.parametrize("device, message", [
    ("foo", "'foo' is not a device"),
    ("xla", "device type 'xla' is not supported"),
])
def test_unknown_devices_are_refused(device, message):
    assert check_device("auto") == "auto" and check_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match=message) as caught:
        check_device(device)
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 2


def test_auto_is_cuda_only_when_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused_in_one_line():
    with pytest.raises(DeviceError, match="CUDA is not available on this machine"):
        resolve_device("cuda")
