"""rsb.models: the network built as train.py builds it, and rebuilt from a weights file (safetensors only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_weights_are_safetensors_and_never_unpickled(tmp_path):
    """models/*.safetensors hold tensors only; a pickle put in their place is refused, its payload never run."""
    from rsb.models import load_model

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.safetensors")
    with pytest.raises(Exception) as e:
        load_model("test_resnet", tmp_path / "evil.safetensors", 20)
    assert "SafetensorError" in type(e.value).__name__ or "header" in str(e.value).lower(), e.value
    assert not (tmp_path / "pwned").exists()


def test_a_vit_is_built_for_its_training_size_and_a_resnet_is_not():
    """train.py's --model-kwargs img_size=<size>, as DeiT's main.py builds its models: a ViT fixes its patch grid at
    creation; a ResNet takes any size and gets no kwarg; at the paper's 224 neither gets one."""
    from rsb.models import model_kwargs

    assert model_kwargs("deit_small_patch16_224", 32) == {"img_size": 32}
    assert model_kwargs("deit_small_patch16_224", 224) == {}
    assert model_kwargs("resnet50", 32) == {} and model_kwargs("test_resnet", 32) == {}
