# An example cluster description (what `nix eval ./nix#hyperfleet` renders). Paths are host
# paths on the workers; with lib.mkVmImage they would be store paths instead.
let
  images.web = {
    kernel = "/var/lib/hyperfleet/images/web/vmlinux";
    initrd = "/var/lib/hyperfleet/images/web/initrd";
    disk = "/var/lib/hyperfleet/images/web/disk.raw";
    cmdline = "console=ttyS0 root=/dev/vda rw";
  };
in
{
  namespace = "fleet";
  defaults = { memory = "512Mi"; runStrategy = "Always"; };

  nodes.worker-1 = { pool = "general"; overcommit = { cpu = 2.0; }; };
  nodes.worker-2 = { pool = "general"; labels = { zone = "b"; }; };

  vms.web = {
    replicas = 2;
    cpus = 2;
    maxCpus = 4;
    memory = "1Gi";
    image = images.web;
    network = "bridge";
    labels = { app = "web"; };
    workerPool = "general";
    affinity = { vmAntiAffinity = [ { app = "web"; } ]; };
  };
  vms.db = {
    cpus = 4;
    memory = "4Gi";
    firmware = "/usr/share/cloud-hypervisor/hypervisor-fw";
    disks = [ { name = "root"; path = "/var/lib/hyperfleet/images/db.raw"; } ];
    vsock = { cid = 3; };
    labels = { app = "db"; };
  };

  jobs.db-nightly-snapshot = {
    operation = "vm.snapshot";
    target = "db";
    data = { destination = "/var/lib/hyperfleet/snapshots/db"; };
    requiredCapabilities = [ "snapshot" ];
  };
}
