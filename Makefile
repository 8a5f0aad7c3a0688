# The README's two commands: `make demo` (the main job) and `make test` (the tests).
.PHONY: install demo demo-down lint test chart-files

install:
	bash .ci/install

# The demo runs in containers on a node in a network namespace of its own: it needs root.
demo: install
	zstack-dev images
	zstack-dev up --node containers
	zstack-dev demo up

demo-down:
	zstack-dev demo down
	zstack-dev down

lint:
	ruff check .

test: install lint
	python3 -m pytest

# The chart ships copies of crds/ and dashboards/ (Helm reads only files inside the chart); tests/chart
# fails when they differ from the originals.
chart-files:
	rm -f charts/zstack-operator/crds/*.yaml charts/zstack-operator/dashboards/*.json
	cp crds/*.yaml charts/zstack-operator/crds/
	mkdir -p charts/zstack-operator/dashboards && cp dashboards/*.json charts/zstack-operator/dashboards/

# ---- kind: the operator and a 3-MN cloud in a local Docker-based cluster (https://kind.sigs.k8s.io) ----
#
#   make kind-up images kind-load deploy     # cluster, both images, the operator (Helm) and a ZStackCluster
#   make kind-down
#
# Overrides: `make images IMAGE_REGISTRY=ghcr.io/me` (the images become ghcr.io/me/zstack-node:<version> ...);
# `make images VERSION=0.2.0`. These targets need Docker, kind, Helm 3 and kubectl.
.PHONY: kind-up images kind-load deploy kind-down

# The project version, from pyproject.toml.
VERSION := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
IMAGE_REGISTRY ?=
IMAGE_PREFIX = $(if $(IMAGE_REGISTRY),$(patsubst %/,%,$(IMAGE_REGISTRY))/)
NODE_IMAGE = $(IMAGE_PREFIX)zstack-node:$(VERSION)
OPERATOR_REPOSITORY = $(IMAGE_PREFIX)zstack-operator
OPERATOR_IMAGE = $(OPERATOR_REPOSITORY):$(VERSION)
KIND_CLUSTER := zstack
KIND_EXAMPLE := examples/zstackcluster-kind.yaml
KIND_ZSC := demo

DOCKER_HOW := install Docker: https://docs.docker.com/engine/install/
KIND_HOW := install kind: https://kind.sigs.k8s.io/docs/user/quick-start/
HELM_HOW := install Helm 3: https://helm.sh/docs/intro/install/
KUBECTL_HOW := install kubectl: https://kubernetes.io/docs/tasks/tools/
# $(call need,TOOL,HOW): stop the target at once, saying what to install, when TOOL is not on PATH.
need = @command -v $(1) >/dev/null 2>&1 || { echo "make $@: $(1) not found on PATH; $(2)" >&2; exit 1; }

kind-up:
	$(call need,docker,$(DOCKER_HOW))
	$(call need,kind,$(KIND_HOW))
	@if kind get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
		echo "kind cluster $(KIND_CLUSTER) already exists: nothing to do"; \
	else \
		kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml; \
	fi

images:
	$(call need,docker,$(DOCKER_HOW))
	docker build --target node --build-arg VERSION=$(VERSION) -t $(NODE_IMAGE) .
	docker build --target operator --build-arg VERSION=$(VERSION) -t $(OPERATOR_IMAGE) .

kind-load:
	$(call need,docker,$(DOCKER_HOW))
	$(call need,kind,$(KIND_HOW))
	kind load docker-image $(NODE_IMAGE) $(OPERATOR_IMAGE) --name $(KIND_CLUSTER)

# The operator from the chart, then the example with its spec.image set to the MN image built above.
deploy:
	$(call need,helm,$(HELM_HOW))
	$(call need,kubectl,$(KUBECTL_HOW))
	helm upgrade --install zstack-operator charts/zstack-operator -n zstack-system --create-namespace --wait \
		--set image.repository=$(OPERATOR_REPOSITORY) --set image.tag=$(VERSION)
	sed 's|^  image: .*|  image: $(NODE_IMAGE)|' $(KIND_EXAMPLE) | kubectl apply -f -
	kubectl wait zsc/$(KIND_ZSC) --for=condition=Ready --timeout=5m

kind-down:
	$(call need,docker,$(DOCKER_HOW))
	$(call need,kind,$(KIND_HOW))
	kind delete cluster --name $(KIND_CLUSTER)
