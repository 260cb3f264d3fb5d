"""The Task: a trained torch classifier, its data, its loss, and the body/head split.

The head is the trailing part of the model that `indexer.translate` turns into a pure JAX function; the body
runs once per example (torch, no grad) and its outputs, the cut features h_i, are cached in the run directory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import TaskError
from .translate import TranslatedHead, flatten_modules, split_sequential, translate_head


def default_preview(x: Any) -> str:
    """A short preview of an input: text as is, images as PNG thumbnails (`indexer.previews.image_preview`),
    other arrays by shape and range."""
    from .previews import image_pixels, image_preview

    if isinstance(x, str):
        return x[:200]
    if isinstance(x, torch.Tensor | np.ndarray):
        a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
        if image_pixels(a) is not None and np.isfinite(a).all():
            return image_preview()(a)
        return f"array{list(a.shape)} min={a.min():.3g} max={a.max():.3g}"
    return repr(x)[:200]


def load_checkpoint(state: Any) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict: a mapping as is, or a file read without pickle (safetensors or weights_only)."""
    if isinstance(state, dict):
        return state
    path = Path(state)
    if not path.is_file():
        raise TaskError(f"checkpoints: state must be a state_dict or an existing file, got {str(state)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise TaskError(f"checkpoints: {str(path)!r} holds a {type(loaded).__name__}, not a state_dict")
    return loaded


def check_checkpoints(checkpoints: Any, model: nn.Module) -> tuple[tuple[Any, float], ...]:
    """Validates `[(state, learning_rate), ...]`: positive finite rates, state_dicts matching the model's keys."""
    if isinstance(checkpoints, str | bytes) or not isinstance(checkpoints, Sequence) or len(checkpoints) == 0:
        raise TaskError(f"checkpoints must be a non-empty list of (state_dict, learning_rate), got {checkpoints!r}")
    keys = set(model.state_dict())
    out = []
    for i, item in enumerate(checkpoints):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TaskError(f"checkpoints[{i}] must be a (state_dict, learning_rate) pair, got {item!r}")
        state, lr = item
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
            raise TaskError(f"checkpoints[{i}]: learning_rate must be a finite number > 0, got {lr!r}")
        if isinstance(state, dict) and set(state) != keys:
            missing, extra = sorted(keys - set(state))[:3], sorted(set(state) - keys)[:3]
            raise TaskError(
                f"checkpoints[{i}]: state_dict keys differ from the model's (missing {missing}, extra {extra})"
            )
        if not isinstance(state, dict) and not Path(state).is_file():
            raise TaskError(f"checkpoints[{i}]: state must be a state_dict or an existing file, got {state!r}")
        out.append((state, float(lr)))
    return tuple(out)


@dataclass(frozen=True, kw_only=True, eq=False)
class Task:
    """What to index: a trained classifier and its train/test datasets of `(x, y)` pairs.

    Args:
        model: the trained torch classifier (logits out). For `nn.Sequential` the head defaults to the trailing
            layers that translate to JAX.
        train: training dataset yielding `(x, y)` with integer labels.
        test: optional test dataset, same form; its examples are the stored queries.
        l2: the lambda of (lambda/2)||theta_head||^2 (weights and biases) added to the mean training loss.
        head_layers: number of trailing (flattened) Sequential layers forming the head; None = automatic.
        body, head: an explicit split (both modules) for models that are not `nn.Sequential`.
        batch_size: batch size of the body forward pass.
        preview: x -> short string stored as the example's preview.
        train_ids, test_ids: the Task's own example ids (default: positions in the datasets).
        name: a label for the manifest.
        checkpoints: optional training checkpoints for TracIn, a list of `(state, learning_rate)` with `state`
            a state_dict of `model` (or a path to one saved with torch.save / safetensors) and `learning_rate`
            the step size in effect around it (Pruthi et al. 2020). Used by the label-noise job's "tracin".
        scope: the parameters influence is taken over: "head" (the translated head, default), "last-block"
            (a transformer's last block + head, `Task.from_hf(..., scope="last-block")`, which sets `block`),
            "model" (every layer of the model with parameters, `indexer.layers`) or a list of module names as in
            `model.named_modules()` (those modules; a container means every layer inside it). Layers with
            parameters that scope="model" cannot take are refused by name (`indexer.layers.SUPPORTED`).
        block: the `indexer.torch_backend.LastBlockScope` of a "last-block" Task (None otherwise).
        device: where the model runs (batches are moved there); None = where the model's parameters are. A
            device given moves the model there.
    """

    model: nn.Module
    train: Dataset
    test: Dataset | None = None
    l2: float = 0.0
    head_layers: int | None = None
    body: nn.Module | None = None
    head: nn.Module | None = None
    batch_size: int = 256
    preview: Callable[[Any], str] = default_preview
    train_ids: Sequence[int] | None = None
    test_ids: Sequence[int] | None = None
    name: str = "task"
    checkpoints: Sequence[tuple[Any, float]] | None = None
    scope: str | Sequence[str] = "head"
    block: Any = None
    device: str | torch.device | None = None
    _model_scope: Any = field(init=False, repr=False, default=None)
    _split: tuple[nn.Module, list[nn.Module]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TaskError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.l2, int | float) or not math.isfinite(self.l2) or self.l2 < 0:
            raise TaskError(f"l2 must be a finite number >= 0, got {self.l2!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TaskError(f"batch_size must be a positive int, got {self.batch_size!r}")
        for name in ("train", "test"):
            ds = getattr(self, name)
            if ds is None and name == "test":
                continue
            if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
                raise TaskError(f"{name} must be a map-style dataset with __len__ and __getitem__, got {ds!r}")
            if len(ds) == 0:
                raise TaskError(f"{name} dataset is empty")
        for name in ("train_ids", "test_ids"):
            ids = getattr(self, name)
            ds = self.train if name == "train_ids" else self.test
            if ids is None:
                continue
            if ds is None or len(ids) != len(ds):
                raise TaskError(f"{name} must have one id per example ({0 if ds is None else len(ds)}), got {len(ids)}")
            arr = np.asarray(ids)
            if arr.dtype.kind not in "iu" or len(np.unique(arr)) != len(arr) or (arr < 0).any():
                raise TaskError(f"{name} must be unique non-negative integers")
        if (self.body is None) != (self.head is None):
            raise TaskError("pass both body= and head= (or neither)")
        if self.head is not None:
            split = (self.body, flatten_modules(self.head))
        else:
            split = split_sequential(self.model, self.head_layers)
        object.__setattr__(self, "_split", split)
        self._set_device()
        if isinstance(self.scope, str) and self.scope not in ("head", "last-block", "model"):
            raise TaskError(
                f"scope must be 'head', 'last-block', 'model' or a list of module names, got {self.scope!r}"
            )
        if self.scope_kind == "model":
            from .logra import model_scope_of

            object.__setattr__(self, "scope", self.scope if self.scope == "model" else tuple(self.scope))
            object.__setattr__(self, "_model_scope", model_scope_of(self))
        if (self.scope == "last-block") != (self.block is not None):
            raise TaskError(
                "scope='last-block' needs block= (a LastBlockScope; Task.from_hf(..., scope='last-block') sets it) "
                f"and scope='head' takes none; got scope={self.scope!r}, block={type(self.block).__name__}"
            )
        if self.checkpoints is not None:
            object.__setattr__(self, "checkpoints", check_checkpoints(self.checkpoints, self.model))
        self.model.eval()

    def to_device(self, device: str | torch.device) -> None:
        """Moves the model to `device`, where the build then runs it (a Ray actor given a GPU calls this)."""
        object.__setattr__(self, "device", device)
        self._set_device()

    def _set_device(self) -> None:
        self.model.eval()
        first = next(self.model.parameters(), None)
        if self.device is None:
            device = first.device if first is not None else torch.device("cpu")
        else:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise TaskError(f"device must be a torch device or its name, got {self.device!r}") from err
            self.model.to(device)
        object.__setattr__(self, "device", device)

    @property
    def scope_kind(self) -> str:
        """ "head", "last-block" or "model" (a list of module names is a "model" scope over those modules)."""
        return self.scope if isinstance(self.scope, str) and self.scope != "model" else "model"

    @property
    def model_scope(self) -> Any:
        """The `indexer.logra.ModelScope` of a scope="model" Task (None otherwise)."""
        return self._model_scope

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        tokenizer: Any,
        *,
        train: Sequence[tuple[str, int]],
        test: Sequence[tuple[str, int]] | None = None,
        scope: str = "head",
        l2: float = 0.0,
        batch_size: int = 64,
        max_length: int = 128,
        **kwargs: Any,
    ) -> Task:
        """A Task for a Hugging Face sequence classifier over text datasets of `(text, label)` pairs.

        The frozen encoder is the body (texts tokenized in batches sorted by length; `batch_size` texts per
        forward, truncated to `max_length` tokens); the model's classification layers are the head (BERT/MiniLM:
        pooler + classifier, RoBERTa: dense + tanh + out_proj, DistilBERT: pre_classifier + ReLU + classifier,
        or `indexer.hf.HFEncoderClassifier(encoder, head)`). Previews are the texts. See `indexer.hf`.

        `scope="last-block"` takes influence over the encoder's last transformer block plus the head: the build
        then also stores projected per-example gradients of that scope and its projected Gauss-Newton curvature
        (`indexer.block`), and explain's gradient methods use them.
        """
        from .hf import task_kwargs_from_hf

        fields = task_kwargs_from_hf(
            model, tokenizer, train=train, test=test, scope=scope, batch_size=batch_size, max_length=max_length
        )
        if scope == "last-block":
            from .torch_backend import LastBlockScope

            fields["block"] = LastBlockScope(model, tokenizer, batch_size=batch_size, max_length=max_length)
        return cls(**fields, l2=l2, **kwargs)

    @property
    def body_module(self) -> nn.Module:
        return self._split[0]

    @property
    def head_modules(self) -> list[nn.Module]:
        return self._split[1]

    def translated_head(self) -> TranslatedHead:
        return translate_head(self.head_modules)

    def head_forward(self, h: torch.Tensor) -> torch.Tensor:
        first = next((p for m in self.head_modules for p in m.parameters()), None)
        out = h if first is None or not h.is_floating_point() else h.to(device=first.device, dtype=first.dtype)
        for layer in self.head_modules:
            out = layer(out)
        return out

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        """Body forward of a batch (no grad) -> cut features as float32 numpy."""
        self.model.eval()
        if isinstance(x, torch.Tensor):  # batches go where the model is, float inputs in its dtype
            first = next(self.model.parameters(), None)
            dtype = first.dtype if first is not None and x.is_floating_point() else x.dtype
            x = x.to(device=self.device, dtype=dtype)
        h = self.body_module(x)
        return h.detach().cpu().numpy().astype(np.float32, copy=False)

    def fingerprint(self) -> str:
        """sha256 over the model's parameters and buffers (names, shapes, dtypes, values)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(t.shape)).encode())
            digest.update(str(t.dtype).encode())
            digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return digest.hexdigest()

    def ids(self, split: str) -> np.ndarray:
        ds = self.train if split == "train" else self.test
        own = self.train_ids if split == "train" else self.test_ids
        if ds is None:
            return np.zeros(0, np.int64)
        return np.asarray(own, np.int64) if own is not None else np.arange(len(ds), dtype=np.int64)

    def config(self) -> dict[str, Any]:
        """The Task as JSON data for the manifest."""
        return {
            "name": self.name,
            "l2": float(self.l2),
            "n_train": len(self.train),
            "n_test": 0 if self.test is None else len(self.test),
            "head_layers": len(self.head_modules),
            "body": type(self.body_module).__name__,
            **({"checkpoint_learning_rates": [lr for _, lr in self.checkpoints]} if self.checkpoints else {}),
            # runs of the default scope keep the task record they always had (resumes compare it)
            **({"scope": self.scope, "block_params": self.block.n_params} if self.scope == "last-block" else {}),
            **(
                {
                    "scope": "model",
                    "model_layers": self._model_scope.names,
                    "model_params": self._model_scope.n_params,
                }
                if self.scope_kind == "model"
                else {}
            ),
        }
