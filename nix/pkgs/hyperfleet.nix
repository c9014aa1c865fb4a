# The `hyperfleet` command (controller and agent) from this repository's source.
{ lib, python3Packages, git, openssh, gnupg, qemu-utils, src }:
python3Packages.buildPythonApplication {
  pname = "hyperfleet";
  version = "0.1.0";
  pyproject = true;
  inherit src;
  build-system = with python3Packages; [ setuptools wheel ];
  dependencies = with python3Packages; [
    kopf
    kubernetes
    gitpython
    pydantic
    pyyaml
    requests
    requests-unixsocket
    tenacity
    openapi-core
    prometheus-client
    typer
    rich
    python-ulid
    jsonschema
    aiohttp
    numpy
  ];
  # git for GitSources, ssh-keygen and gpg for their spec.verify (commit signatures);
  # qemu-img for the VMs' copy-on-write root disks.
  makeWrapperArgs = [ "--prefix" "PATH" ":" (lib.makeBinPath [ git openssh gnupg qemu-utils ]) ];
  doCheck = false; # the test suite needs the API server build (see the Makefile)
  meta = {
    description = "GitOps reconciler for cloud-hypervisor VMs on Kubernetes";
    license = lib.licenses.asl20;
    mainProgram = "hyperfleet";
  };
}
