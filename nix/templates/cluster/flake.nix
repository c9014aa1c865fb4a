# A cluster repository for a Hyperfleet GitSource (spec.renderer: Auto picks Nix because this
# file exists). The GitSource runs `nix eval --json <this dir>#hyperfleet`, offline: so the
# Hyperfleet library is vendored under ./hyperfleet (copy the repository's nix/lib there).
{
  description = "Hyperfleet cluster";

  outputs = { self }:
    let
      hyperfleet = import ./hyperfleet { };
    in
    {
      hyperfleet = hyperfleet.manifests (import ./cluster.nix);
    };
}
