"""JAX translations of torch heads reproduce the torch logits; torch and JAX per-example gradients agree."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import influence as inf
from indexer import Task, UnsupportedLayerError, split_sequential, translate_head
from indexer.errors import HeadMismatchError, TaskError
from indexer.torch_backend import head_param_names
from indexer.translate import check_head_logits


def torch_reference_grads(
    layers: list[nn.Module], h: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """Per-example gradients [n, p] of the cross-entropy of a torch head by `vmap(grad)`, flattened in the
    order of `influence.flatten_params`: the torch reference the JAX gradients are checked against."""
    head = nn.Sequential(*layers).eval()
    names = [(f"{i}.{name}", i, name) for i, name in head_param_names(layers)]
    params = {key: getattr(layers[i], name).detach() for key, i, name in names}

    def loss(p: dict[str, torch.Tensor], hi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, p, (hi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for s in range(0, len(h), batch_size):
        hb = torch.as_tensor(np.asarray(h[s : s + batch_size]))
        yb = torch.as_tensor(np.asarray(y[s : s + batch_size]), dtype=torch.int64)
        grads = per_example(params, hb, yb)
        out.append(torch.cat([grads[key].reshape(len(hb), -1) for key, _, _ in names], dim=1).numpy())
    return np.concatenate(out)


def every_layer_head() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Dropout(0.3),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
        nn.Linear(16, 8, bias=False),
        nn.GELU(approximate="tanh"),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(8, 5),
    ).eval()


def test_jax_head_reproduces_torch_logits():
    model = every_layer_head()
    body, head = split_sequential(model)
    assert isinstance(body, nn.Identity)
    translated = translate_head(head)
    h = torch.randn(64, 3, 4)
    with torch.no_grad():
        expected = model(h).numpy()
    got = np.asarray(inf.apply_head(translated.spec, translated.params, h.numpy()))
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert translated.n_classes == 5
    assert translated.n_params == sum(p.numel() for p in model.parameters())


def test_conv_body_is_split_off_and_unsupported_head_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    body, head = split_sequential(model)
    assert [type(m) for m in head] == [nn.ReLU, nn.Flatten, nn.Linear]
    assert isinstance(body, nn.Sequential) and isinstance(body[0], nn.Conv2d)
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        translate_head(split_sequential(model, head_layers=4)[1])
    with pytest.raises(UnsupportedLayerError, match="Linear"):
        translate_head([nn.ReLU()])


class Sine(nn.Module):
    """An activation with no JAX translation (a user's own layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


@pytest.mark.parametrize(
    ("model", "head_layers", "named"),
    [
        (nn.Sequential(nn.Linear(3, 2), Sine()), None, r"layer 1 \(Sine\)"),
        (nn.Sequential(nn.Linear(3, 4), Sine(), nn.ReLU()), None, r"layer 1 \(Sine\)"),
        (nn.Sequential(nn.Linear(3, 4), Sine(), nn.Linear(4, 2)), 3, r"layer 1 \(Sine\)"),
        (nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2), nn.LayerNorm(2)), None, r"layer 2 \(LayerNorm\)"),
        (nn.Sequential(nn.ReLU(), nn.Tanh()), None, r"Sequential\(ReLU, Tanh\).*no Linear"),
    ],
)
def test_every_message_that_refuses_a_head_names_the_layer(model, head_layers, named):
    """`Sequential(Linear, Sine)` names `Sine` (it used to say "head is empty"), at Task() or at translation."""
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(UnsupportedLayerError, match=named) as err:
        Task(model=model, train=ds, head_layers=head_layers).translated_head()
    assert "head is empty" not in str(err.value)


@pytest.mark.parametrize(
    ("label", "expected"),
    [(3, 3), (np.int64(2), 2), (torch.tensor(1), 1), (torch.tensor([4]), 4), (2.0, 2), (torch.tensor(1.0), 1)],
)
def test_whole_number_labels_are_class_ids(label, expected):
    from indexer.examples import label_of

    got = label_of(label, 0, "train dataset")
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    ("label", "shown"),
    [(0.9, "label 0.9;"), (torch.tensor(1.9), "label 1.9;"), (float("nan"), "label nan;"), ("cat", "label 'cat';")],
)
def test_non_integer_labels_are_refused_by_dataset_example_and_value(label, shown):
    from indexer.examples import label_of

    with pytest.raises(TaskError, match=f"test dataset: example 17 has {shown}"):
        label_of(label, 17, "test dataset")


def test_a_float_label_tensor_is_refused_naming_the_first_non_integer_example():
    """The issue's case: labels 0.9, 1.9, 2.9 as a float tensor were truncated to 0, 1, 2."""
    from indexer.examples import iterate

    y = torch.tensor([0.0, 1.0, 2.0, 0.9, 1.9, 2.9])
    ds = torch.utils.data.TensorDataset(torch.zeros(6, 3), y)
    assert next(iterate(ds, range(3), 2, name="train dataset"))[1].tolist() == [0, 1]
    with pytest.raises(TaskError, match=r"train dataset: example 3 has label 0\.9"):
        list(iterate(ds, range(6), 2, name="train dataset"))
    with pytest.raises(TaskError, match=r"train dataset: example 5 has label 2\.9"):
        list(iterate(ds, range(5, 6), 2, name="train dataset"))


def test_logit_check_refuses_a_mismatch():
    a = np.zeros((3, 2))
    assert check_head_logits(a, a + 1e-7, tolerance=1e-5) <= 1e-7
    with pytest.raises(HeadMismatchError, match="max abs diff"):
        check_head_logits(a, a + 1e-2, tolerance=1e-5)


def test_torch_and_jax_per_example_gradients_agree():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    _, head = split_sequential(model)
    translated = translate_head(head)
    h = np.random.default_rng(0).normal(size=(33, 6))
    y = np.random.default_rng(1).integers(0, 4, size=33)
    theta, unravel = inf.flatten_params(translated.params)
    g_jax = np.asarray(inf.compute_per_example_grads(translated.spec, unravel, theta, h, y, batch_size=8))
    g_torch = torch_reference_grads(head, h, y, batch_size=10)
    np.testing.assert_allclose(g_jax, g_torch, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"l2": -1.0}, "l2"),
        ({"l2": float("nan")}, "l2"),
        ({"batch_size": 0}, "batch_size"),
        ({"train": []}, "empty"),
    ],
)
def test_task_rejects_bad_arguments(kwargs, match):
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))
    args = {"model": nn.Sequential(nn.Linear(3, 2)), "train": ds} | kwargs
    with pytest.raises(TaskError, match=match):
        Task(**args)


@pytest.mark.parametrize(
    ("x_bad", "y_bad", "match"),
    [
        ((5, float("nan")), None, "example 5 gives non-finite"),
        (None, (3, 7), "train dataset: example 3 has label 7, outside the model's classes \\[0, 2\\)"),
        (None, (6, 0.9), "train dataset: example 6 has label 0.9; labels must be integer class ids"),
    ],
)
def test_bad_training_data_is_refused_by_the_build(tmp_path, x_bad, y_bad, match):
    from api import build_index
    from api.index import Index
    from store import CorruptRunError, RunNotFoundError

    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    if isinstance(y_bad and y_bad[1], float):
        y = y.float()  # a float label tensor: 0.9 must not become class 0
    if x_bad:
        x[x_bad[0], 0] = x_bad[1]
    if y_bad:
        y[y_bad[0]] = y_bad[1]
    ds = torch.utils.data.TensorDataset(x, y)
    task = Task(model=nn.Sequential(nn.Linear(3, 2)), train=ds, batch_size=8)
    with pytest.raises(TaskError, match=match):
        build_index(task, tmp_path / "run", progress=False)
    # Refused before anything is written (NaN in the first batch), or left incomplete and unopenable (labels).
    if x_bad:
        assert not (tmp_path / "run").exists()
    with pytest.raises((RunNotFoundError, CorruptRunError), match=r"no run directory|no manifest|incomplete"):
        Index(tmp_path / "run")
