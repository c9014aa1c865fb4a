# Hyperfleet developer entry points. A newcomer needs only `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
K8S_DIR ?= $(or $(HYPERFLEET_K8S_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/hyperfleet-k8s)
APISERVER := $(K8S_DIR)/chroot/root/out/crd-apiserver
PYTEST_ARGS ?=

.PHONY: demo test lint unit integration bench system-deps apiserver crds clean

# With KUBECONFIG set, the demo runs against that cluster instead of a local API server.
demo: system-deps $(VENV)/.installed $(if $(KUBECONFIG),,apiserver)
	HYPERFLEET_K8S_DIR=$(K8S_DIR) $(BIN)/hyperfleet demo $(if $(KUBECONFIG),--kubeconfig "$(KUBECONFIG)")

test: system-deps $(VENV)/.installed apiserver lint
	HYPERFLEET_K8S_DIR=$(K8S_DIR) $(BIN)/pytest -ra $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	@# layers and who may import the test tooling: [tool.importlinter] in pyproject.toml
	$(BIN)/lint-imports
	@# mypy resolves hyperfleet.* through a symlinked view of the package-dir mapping
	@mkdir -p build/typecheck/hyperfleet && touch build/typecheck/hyperfleet/__init__.py
	@ln -sfn $(CURDIR)/operator build/typecheck/hyperfleet/operator
	@ln -sfn $(CURDIR)/reconcilers build/typecheck/hyperfleet/reconcilers
	MYPYPATH=build/typecheck $(BIN)/mypy $$(find operator reconcilers -name '*.py' \
	  | sed -e 's|/__init__\.py$$||' -e 's|\.py$$||' -e 's|/|.|g' -e 's|^|-m hyperfleet.|')
	MYPYPATH=build/typecheck $(BIN)/mypy tests $(wildcard bench/*.py)
	$(BIN)/hyperfleet crds --check
	$(BIN)/python docs/gen_crd_reference.py --check

unit: $(VENV)/.installed
	$(BIN)/pytest -ra tests/unit $(PYTEST_ARGS)

bench: system-deps $(VENV)/.installed apiserver
	HYPERFLEET_K8S_DIR=$(K8S_DIR) $(BIN)/python bench/run.py

crds: $(VENV)/.installed
	$(BIN)/hyperfleet crds
	$(BIN)/python -m tests.chartutil sync-crds
	$(BIN)/python docs/gen_crd_reference.py

# OS packages the stack needs: kubectl (the real client), openssl (test certificates),
# git, debootstrap (builds the API server once), nix (evaluates Nix cluster repos),
# ssh-keygen and gpg (GitSource commit signatures: spec.verify and its tests).
system-deps:
	@missing=""; \
	for c in kubectl:kubectl openssl:openssl git:git debootstrap:debootstrap curl:curl \
	         nix-instantiate:nix-bin qemu-img:qemu-utils ssh-keygen:openssh-client gpg:gpg; do \
	  command -v $${c%%:*} >/dev/null || missing="$$missing $${c#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq; \
	  for p in $$missing; do \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$p \
	      || { [ $$p = kubectl ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client; }; \
	  done; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The genuine apiextensions-apiserver + etcd, built once from Debian packages and cached.
apiserver:
	@if [ ! -x "$(APISERVER)" ]; then \
	  echo "building the API server into $(K8S_DIR) (one time, ~5 min)"; \
	  bash tests/k8s-apiserver/build.sh "$(K8S_DIR)/chroot"; \
	fi

clean:
	rm -rf .demo .pytest_cache .mypy_cache .ruff_cache
