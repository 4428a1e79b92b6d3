import pytest
import torch

from leukodetect.errors import BadCheckpointError, LeukoError
from leukodetect.models import create_model, list_models, register_model
from leukodetect.models.registry import ModelSpec, get_spec

PAPER_ARCHS = ["resnet50", "googlenet", "resnet101", "resnet152", "vgg16", "vgg19"]


def test_registry_names():
    assert set(PAPER_ARCHS + ["tiny"]) <= set(list_models())


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec("resnet50", lambda n, p: None, "fc", "layer4", "dup"))


def test_unknown_architecture_names_the_choices():
    with pytest.raises(LeukoError, match="resnet50"):
        create_model("resnet49")


@pytest.mark.parametrize("name", PAPER_ARCHS)
def test_paper_architectures_have_a_two_way_head(name):
    with torch.device("meta"):  # no memory, no weights: only the structure is checked
        model = create_model(name)
    head = model.get_submodule(get_spec(name).head)
    assert head.out_features == 2
    # Grad-CAM's layer must give a spatial feature map (N, C, H, W), not a vector: hook it and look.
    seen = []
    model.get_submodule(get_spec(name).cam_layer).register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.device("meta"):
        model(torch.empty(1, 3, 96, 96))
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][2] >= 1 and seen[0][3] >= 1


def test_tiny_forward():
    model = create_model("tiny").eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2)


def test_local_weights_roundtrip(tmp_path):
    a = create_model("tiny")
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = create_model("tiny", weights=tmp_path / "w.pt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_a_guarded_leukodetect_safetensors_file_starts_a_new_run(crop_checkpoint, tmp_path):
    """The shipped model is a safetensors file holding its guard's arrays beside the weights: --weights takes the weights."""
    import numpy as np

    from leukodetect.runtime.checkpoint import GUARD_TENSORS, load_checkpoint, save_safetensors

    bundle = load_checkpoint(crop_checkpoint)
    bundle["guard"] = {"threshold": 1.0, **{k: np.ones((2, 2), dtype=np.float32) for k in GUARD_TENSORS}}
    path = save_safetensors(bundle, tmp_path / "guarded.safetensors", half=False)
    model = create_model(bundle["arch"], weights=path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, bundle["state_dict"][key].float() if value.is_floating_point() else bundle["state_dict"][key])


def test_weights_of_another_head_size_keep_the_body(tmp_path):
    a = create_model("tiny", num_classes=5)
    torch.save(a.state_dict(), tmp_path / "w5.pt")
    b = create_model("tiny", num_classes=2, weights=tmp_path / "w5.pt")
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert b.fc.out_features == 2


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(BadCheckpointError, match="does not fit architecture 'tiny'"):
        create_model("tiny", weights=tmp_path / "other.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BadCheckpointError, match="not a readable weights file"):
        create_model("tiny", weights=tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_missing_weights_file(tmp_path):
    with pytest.raises(BadCheckpointError, match="does not exist"):
        create_model("tiny", weights=tmp_path / "nope.pt")


def test_each_architecture_has_its_own_learning_rate_unless_one_is_given():
    from leukodetect.config import RunConfig

    cfg = RunConfig.from_dict({"model": {"arch": "vgg16"}})
    assert cfg.train.lr is None  # left out: the architecture decides
    assert cfg.resolved().train.lr == get_spec("vgg16").scratch_lr == 1e-4  # no batch norm: 1e-3 diverges
    cfg.model.arch = "resnet50"
    assert cfg.resolved().train.lr == 1e-3
    cfg.train.lr = 0.05
    assert cfg.resolved().train.lr == 0.05  # an explicit rate wins
    with pytest.raises(LeukoError, match="must be positive"):
        RunConfig.from_dict({"train": {"lr": 0}})
