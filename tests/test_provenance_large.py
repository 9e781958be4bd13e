"""Fingerprints of tensors above 2^24 entries (ESMFold v1's 2560 x 10240 stem weights) sample valid positions."""

import torch

from adapters.provenance import SAMPLES_PER_TENSOR, _sample


def test_sample_of_a_large_tensor_ends_at_its_last_entry():
    tensor = torch.arange(2560 * 10240, dtype=torch.float32).reshape(2560, 10240)
    values = torch.frombuffer(bytearray(_sample(tensor)), dtype=torch.bfloat16).float()
    assert values.numel() == SAMPLES_PER_TENSOR
    assert values[-1] == torch.tensor(2560 * 10240 - 1.0).to(torch.bfloat16).float()  # was an IndexError
    small = torch.arange(100.0)
    assert _sample(small) == torch.arange(100.0)[torch.linspace(0, 99, 16).long()].to(torch.bfloat16).view(
        torch.int16).numpy().tobytes()  # small tensors: positions unchanged
