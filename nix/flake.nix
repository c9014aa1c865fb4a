# Hyperfleet's Nix side. No inputs: everything here evaluates offline; the parts that build
# (VM images, the agent package, the worker module) take nixpkgs from the caller.
#
#   nix eval --json ./nix#hyperfleet           # the example cluster as Hyperfleet manifests
#   nix flake init -t ./nix#cluster            # start a cluster repository for a GitSource
{
  description = "Hyperfleet: VM image builder, worker NixOS module, cluster-to-manifests library";

  outputs = { self }:
    let
      lib = import ./lib { };
    in
    {
      # Pure library: cluster description -> VirtualMachine/WorkerNode/VmJob objects.
      lib = lib // {
        # VM image builder; needs nixpkgs: self.lib.mkVmImage { pkgs = ...; configuration = ...; }
        mkVmImage = import ./lib/image.nix;
      };

      # services.hyperfleet.agent for worker nodes (cloud-hypervisor, bridge + TAP, the agent).
      nixosModules.worker = import ./modules/worker.nix;
      nixosModules.default = self.nixosModules.worker;

      # callPackage-able derivation of the `hyperfleet` command (agent, controller).
      overlays.default = final: prev: {
        hyperfleet = final.callPackage ./pkgs/hyperfleet.nix { src = ./..; };
      };

      # What a GitSource evaluates (`nix eval --json <flake>#hyperfleet`): the example cluster.
      hyperfleet = lib.manifests (import ./examples/cluster.nix);

      templates.cluster = {
        path = ./templates/cluster;
        description = "A cluster repository whose flake renders Hyperfleet manifests";
      };
      templates.default = self.templates.cluster;
    };
}
