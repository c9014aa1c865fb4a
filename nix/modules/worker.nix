# NixOS module for a Hyperfleet worker node: KVM, cloud-hypervisor, a bridge the VMs' TAP
# devices join, and the agent as a systemd service (an alternative to the chart's DaemonSet:
# here VMMs survive agent restarts, since systemd stops only the agent's own process).
#
#   imports = [ hyperfleet.nixosModules.worker ];
#   nixpkgs.overlays = [ hyperfleet.overlays.default ];
#   services.hyperfleet.agent = {
#     enable = true;
#     kubeconfig = "/var/lib/hyperfleet/kubeconfig";
#     bridge = { name = "hfbr0"; address = "10.80.0.1/16"; };
#   };
{ config, lib, pkgs, ... }:
let
  cfg = config.services.hyperfleet.agent;
  inherit (lib) mkEnableOption mkIf mkOption types optionals escapeShellArgs;
in
{
  options.services.hyperfleet.agent = {
    enable = mkEnableOption "the Hyperfleet node agent";

    package = mkOption {
      type = types.package;
      default = pkgs.hyperfleet;
      defaultText = lib.literalExpression "pkgs.hyperfleet";
      description = "The hyperfleet package (overlays.default provides it).";
    };

    cloudHypervisor = mkOption {
      type = types.package;
      default = pkgs.cloud-hypervisor;
      defaultText = lib.literalExpression "pkgs.cloud-hypervisor";
      description = "cloud-hypervisor package; its binary is passed as --ch-binary.";
    };

    nodeName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "WorkerNode name (--node-name).";
    };

    pool = mkOption { type = types.str; default = "default"; description = "Worker pool (--pool)."; };

    cpus = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "CPUs to advertise (--cpus); null: all of them.";
    };

    memory = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "60Gi";
      description = "Memory to advertise (--memory); null: all of it.";
    };

    socketDir = mkOption {
      type = types.path;
      default = "/run/hyperfleet";
      description = "VMM API sockets, pid files and sleep snapshots (--socket-dir).";
    };

    imageDir = mkOption {
      type = types.path;
      default = "/var/lib/hyperfleet";
      description = "Where kernels and disk images referenced by VirtualMachines live.";
    };

    kubeconfig = mkOption {
      type = types.path;
      description = "kubeconfig with the agent's credentials (the chart's agent ServiceAccount).";
    };

    metricsPort = mkOption {
      type = types.port;
      default = 0;
      description = "Prometheus metrics port on 127.0.0.1 (0: off).";
    };

    bridge = {
      name = mkOption { type = types.str; default = "hfbr0"; description = "Bridge the VM TAPs join."; };
      address = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10.80.0.1/16";
        description = "Host address on the bridge (the VMs' gateway); null: none.";
      };
      uplink = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "enp1s0";
        description = "Physical interface enslaved to the bridge (VMs on the LAN); null: routed.";
      };
      tapPattern = mkOption {
        type = types.str;
        default = "hf*";
        description = "TAP names to enslave (the Nix library names them hf<hash>).";
      };
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More `hyperfleet agent` arguments.";
    };
  };

  config = mkIf cfg.enable {
    boot.kernelModules = [ "kvm-intel" "kvm-amd" "tun" "vhost_net" "bridge" ];
    environment.systemPackages = [ cfg.cloudHypervisor cfg.package ];

    # The bridge and TAP enslavement: cloud-hypervisor creates each VM's TAP; networkd adds
    # it to the bridge as soon as it appears.
    systemd.network.enable = true;
    systemd.network.netdevs."20-${cfg.bridge.name}".netdevConfig = {
      Name = cfg.bridge.name;
      Kind = "bridge";
    };
    systemd.network.networks = {
      "20-${cfg.bridge.name}" = {
        matchConfig.Name = cfg.bridge.name;
        address = optionals (cfg.bridge.address != null) [ cfg.bridge.address ];
        networkConfig.ConfigureWithoutCarrier = true;
        linkConfig.RequiredForOnline = "no";
      };
      "21-hyperfleet-taps" = {
        matchConfig.Name = cfg.bridge.tapPattern;
        networkConfig.Bridge = cfg.bridge.name;
        linkConfig.RequiredForOnline = "no";
      };
    } // lib.optionalAttrs (cfg.bridge.uplink != null) {
      "22-hyperfleet-uplink" = {
        matchConfig.Name = cfg.bridge.uplink;
        networkConfig.Bridge = cfg.bridge.name;
      };
    };
    boot.kernel.sysctl = mkIf (cfg.bridge.uplink == null && cfg.bridge.address != null) {
      "net.ipv4.ip_forward" = 1;
    };

    systemd.tmpfiles.rules = [
      "d ${cfg.socketDir} 0750 root root -"
      "d ${cfg.imageDir} 0750 root root -"
    ];

    systemd.services.hyperfleet-agent = {
      description = "Hyperfleet node agent";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "systemd-networkd.service" ];
      wants = [ "network-online.target" ];
      environment = {
        KUBECONFIG = toString cfg.kubeconfig;
        NODE_NAME = cfg.nodeName;
        HYPERFLEET_CH_BINARY = "${cfg.cloudHypervisor}/bin/cloud-hypervisor";
      };
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/hyperfleet agent " + escapeShellArgs ([
          "--socket-dir" (toString cfg.socketDir)
          "--pool" cfg.pool
          "--metrics-port" (toString cfg.metricsPort)
        ] ++ optionals (cfg.cpus != null) [ "--cpus" (toString cfg.cpus) ]
          ++ optionals (cfg.memory != null) [ "--memory" cfg.memory ]
          ++ cfg.extraArgs);
        # The VMMs run in their own sessions: stopping or restarting the agent leaves them
        # running, and the next agent adopts them from the pid files in socketDir.
        KillMode = "process";
        Restart = "always";
        RestartSec = 2;
        # root for /dev/kvm and TAPs; nothing else of the host is needed.
        AmbientCapabilities = [ "CAP_NET_ADMIN" ];
        DeviceAllow = [ "/dev/kvm rw" "/dev/net/tun rw" "/dev/vhost-net rw" ];
        ProtectSystem = "full";
        ProtectHome = true;
        ReadWritePaths = [ (toString cfg.socketDir) (toString cfg.imageDir) ];
      };
    };

    assertions = [{
      assertion = cfg.bridge.tapPattern != "";
      message = "services.hyperfleet.agent.bridge.tapPattern must not be empty";
    }];
  };
}
