# The pure part of the Hyperfleet Nix library: no nixpkgs, no store paths, only builtins, so
# it evaluates offline (and inside the GitSource reconciler's `nix eval`).
{ }:
let
  manifests = import ./manifests.nix;
in
manifests
