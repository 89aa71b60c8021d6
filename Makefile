# AX — make help lists the targets.
GO        ?= go
BIN       := bin
PREFIX    ?= ax
LABFLAGS  ?=
# Where make openstack-up keeps the test cloud: pid, log, cloud/ (configuration, data, logs).
OPENSTACK_DIR ?= /var/tmp/ax-openstack
# Packages whose kernel-dependent tests run inside a lab guest on Debian's 6.1 kernel.
GUESTPKGS ?= github.com/axproject/ax/ax/dirty github.com/axproject/ax/monitor/agent/guest:TestIntegrationVsock github.com/axproject/ax/netbuffer github.com/axproject/ax/bpf
GOTEST    := $(GO) test -count=1 -timeout 40m

.DEFAULT_GOAL := help
.PHONY: help deps build deb test test-unit test-guest-kernel generate-check demo lab-up lab-down lab-status bench generate vet clean clean-cache openstack-up openstack-down test-openstack openstack-lab

help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-z-]+:.*## /{printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install the Debian packages the lab and tests need (idempotent)
	@sh test/deps.sh

build: ## build axd, axctl (with the lab), ax-nova-hook and the guest workloads into bin/
	CGO_ENABLED=0 $(GO) build -trimpath -tags lab -o $(BIN)/ ./cmd/... ./test/cmd/...
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ax-nova-hook ./nova-hook

deb: ## the Debian package bin/ax_<version>_<arch>.deb (axd, axctl without the lab, ax-agent, ax-nova-hook as libvirt's qemu hook, units; no keys)
	GO=$(GO) sh package/build-deb.sh $(BIN)

vet: ## go vet and gofmt check
	$(GO) vet ./...
	$(GO) vet -tags lab ./cmd/axctl
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }

test: deps build vet generate-check ## everything CI runs: unit, lab, OpenStack and guest-kernel tests (as root)
	$(GOTEST) -skip TestIntegrationOpenStackFT $$($(GO) list ./... | grep -v /test/openstack)
	@# The test cloud's start loads both cores for minutes: not beside the lab's TCG guests.
	$(GOTEST) ./test/openstack/...
	$(GOTEST) -run TestIntegrationOpenStackFT ./test/lab/
	$(MAKE) --no-print-directory test-guest-kernel

test-guest-kernel: deps build ## kernel-dependent tests inside a lab guest on Debian's 6.1 kernel (as root)
	$(BIN)/ax-guestrun -timeout 15m $(addprefix -pkg ,$(GUESTPKGS))

test-unit: ## unit tests only (no root, no QEMU)
	$(GOTEST) -short ./...

demo: deps build ## the lab demo: two-host lab, guest serving a ledger client, summary line
	$(BIN)/axctl lab demo --prefix $(PREFIX) $(LABFLAGS)

lab-up: deps build ## bring the lab up and leave it running (LABFLAGS for more)
	$(BIN)/axctl lab up --prefix $(PREFIX) $(LABFLAGS)

lab-down: build ## remove the lab (safe to repeat, also after a crash)
	$(BIN)/axctl lab down --prefix $(PREFIX)

lab-status: build ## show the lab
	$(BIN)/axctl lab status --prefix $(PREFIX)

bench: deps build ## benchmark report: lab timings, FT, disk levels (none/HA/FT), axd restarts and crashes, failover with each witness, Go benchmarks
	$(BIN)/axctl lab bench --prefix axbench
	$(BIN)/axctl lab bench-ft --prefix axbench
	$(BIN)/axctl lab bench-disk --prefix axbench
	$(BIN)/axctl lab bench-restart --prefix axbench
	$(BIN)/axctl lab bench-witness --prefix axbench
	$(GO) test -run=NONE -bench=. -benchtime=20x ./...

generate: ## rebuild generated code (eBPF objects; needs clang, llvm, libbpf-dev)
	$(GO) generate ./...

generate-check: ## fail if the committed generated code differs from what make generate makes
	@$(MAKE) --no-print-directory generate
	@test -z "$$(git status --porcelain -- bpf)" || { echo "generated code is stale: run make generate and commit:"; git status --porcelain -- bpf; exit 1; }

clean: ## remove build output
	rm -rf $(BIN)

clean-cache: ## remove downloaded kernels and built guest images
	rm -rf /var/cache/ax/lab

# The Vagrant multi-host lab (Vagrantfile, test/vagrant): run as root.
.PHONY: box vagrant-up vagrant-test vagrant-down
VAGRANT_DEB = $$(GO=$(GO) sh package/build-deb.sh $(BIN))

box: ## the Vagrant lab's box from Debian packages (mmdebstrap, cached in /var/cache/ax/vagrant), added as ax/debian12
	sh test/vagrant/box.sh

test-openstack: ## the OpenStack tests alone: AX's Nova client and axd against a real Keystone, Nova, Glance, Placement (TestOpenStackLevels), and the evacuation after a failover with the adopting driver on a second compute host (TestOpenStackEvacuate) (as root, ~7 min)
	@sh test/openstack/deps.sh
	AX_REQUIRE_PRIVILEGED=1 $(GO) test -count=1 -timeout 15m -v -run TestOpenStack ./test/openstack/

openstack-lab: deps ## TestIntegrationOpenStackFT: Nova's libvirt driver, AX's adopting driver and Neutron's Linux bridge agent on the lab's hosts a and b, an FT server on a Neutron port with the ledger client, host a killed (no acked record lost), Nova's record following to b, a back, then 5 min of Nova's periodic tasks (as root, ~13 min)
	AX_REQUIRE_PRIVILEGED=1 AX_OPENSTACK_STAY=5m $(GO) test -count=1 -timeout 30m -v -run TestIntegrationOpenStackFT ./test/lab/

openstack-up: ## that cloud on loopback, left running (clouds.yaml in OPENSTACK_DIR/cloud, default /var/tmp/ax-openstack)
	@sh test/openstack/deps.sh
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ax-openstack ./test/openstack/cmd/ax-openstack
	@sh test/openstack/up.sh $(BIN)/ax-openstack $(OPENSTACK_DIR)

openstack-down: ## stop the cloud openstack-up started (safe to repeat)
	@sh test/openstack/down.sh $(OPENSTACK_DIR)

vagrant-up: deps build ## the Vagrant lab: machines ax-a, ax-b, ax-w, ax-c with AX from make deb (starts a system libvirtd if none runs)
	sh test/vagrant/up.sh "$(VAGRANT_DEB)"

vagrant-test: deps build ## up, FT guest on ax-a, kill ax-a, guest resumes on ax-b, no acked record lost, down (AX_VAGRANT=1; ~17 min under TCG, see README)
	AX_VAGRANT=1 $(GO) test -count=1 -timeout 90m -v -run 'TestVagrant' ./test/vagrant

vagrant-down: ## remove the Vagrant lab and stop the libvirtd vagrant-up started (safe to repeat)
	sh test/vagrant/down.sh
