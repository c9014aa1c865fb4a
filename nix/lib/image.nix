# VM image builder: a NixOS configuration -> { kernel, initrd, disk, cmdline, toplevel } as
# store paths, ready for a VirtualMachine (lib.virtualMachine's `image`). Needs nixpkgs (and
# a build); nothing here runs at `nix eval` time of a cluster repository unless it uses it.
#
#   images.web = hyperfleet.lib.mkVmImage {
#     inherit pkgs;
#     configuration = { services.nginx.enable = true; };
#     diskSize = 4096;          # MiB
#   };
{ pkgs
, configuration ? { }
, diskSize ? 2048
, format ? "raw"
, system ? pkgs.stdenv.hostPlatform.system
}:
let
  nixos = import "${pkgs.path}/nixos/lib/eval-config.nix" {
    inherit system;
    modules = [
      configuration
      ({ lib, modulesPath, ... }: {
        imports = [ "${modulesPath}/profiles/qemu-guest.nix" ];
        # cloud-hypervisor: virtio devices, serial console, direct kernel boot (no bootloader).
        boot.loader.grub.enable = false;
        boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_net" "virtio_console" ];
        boot.kernelParams = [ "console=ttyS0" "console=hvc0" ];
        fileSystems."/" = lib.mkDefault { device = "/dev/vda"; fsType = "ext4"; autoResize = true; };
        networking.useDHCP = lib.mkDefault true;
        services.getty.autologinUser = lib.mkDefault null;
        system.stateVersion = lib.mkDefault "24.05";
      })
    ];
  };
  cfg = nixos.config;
  disk = import "${pkgs.path}/nixos/lib/make-disk-image.nix" {
    inherit pkgs format diskSize;
    inherit (pkgs) lib;
    config = cfg;
    partitionTableType = "none";
    installBootLoader = false;
    copyChannel = false;
  };
in
{
  kernel = "${cfg.system.build.kernel}/${cfg.system.boot.loader.kernelFile}";
  initrd = "${cfg.system.build.initialRamdisk}/${cfg.system.boot.loader.initrdFile}";
  disk = "${disk}/nixos.img";
  cmdline = builtins.concatStringsSep " " (
    [ "init=${cfg.system.build.toplevel}/init" "root=/dev/vda" "rw" ] ++ cfg.boot.kernelParams
  );
  toplevel = cfg.system.build.toplevel;
}
