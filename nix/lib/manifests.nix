# Cluster description (a Nix attribute set) -> Hyperfleet manifests (a list of objects).
#
#   manifests {
#     namespace = "fleet";                          # default namespace of VMs and VmJobs
#     defaults = { cpus = 1; memory = "512Mi"; };   # merged into every VM
#     nodes.worker-1 = { pool = "general"; };       # WorkerNodes (optional: agents register)
#     vms.web = { replicas = 2; cpus = 2; memory = "1Gi"; image = images.web; };
#     jobs.nightly = { operation = "vm.snapshot"; target = "web-0"; };
#   }
#
# Only builtins are used, so it runs under `nix eval` without nixpkgs. Unknown attributes are
# refused with the list of known ones (a typo must not silently drop a field).
let
  apiVersion = "hyperfleet.dev/v1alpha1";

  inherit (builtins)
    attrNames concatLists concatStringsSep elem filter genList hasAttr isAttrs isList
    listToAttrs mapAttrs removeAttrs substring toString hashString throw elemAt;

  # Drop nulls (and empty lists/sets) so the object carries only what was said.
  clean = v:
    if isAttrs v then
      listToAttrs (concatLists (map
        (k:
          let c = clean v.${k}; in
          if c == null || c == { } || c == [ ] then [ ] else [{ name = k; value = c; }])
        (attrNames v)))
    else if isList v then map clean v
    else v;

  check = what: known: attrs:
    let unknown = filter (k: !(elem k known)) (attrNames attrs); in
    if unknown == [ ] then attrs
    else throw "hyperfleet: ${what}: unknown attribute(s) ${concatStringsSep ", " unknown} (known: ${concatStringsSep ", " known})";

  hex = name: hashString "sha256" name;

  # A stable, locally administered MAC and a TAP name (at most 15 characters) per NIC.
  macFor = name:
    let h = hex name; b = i: substring (2 * i) 2 h; in
    "52:54:00:${b 0}:${b 1}:${b 2}";
  tapFor = name: "hf${substring 0 12 (hex name)}";

  vmKeys = [
    "namespace" "labels" "annotations" "replicas" "cpus" "maxCpus" "memory" "maxMemory"
    "liveMigration" "image" "kernel" "initramfs" "cmdline" "firmware" "disks" "interfaces"
    "network" "vsock" "serial" "console" "runStrategy" "powerState" "nodeSelector"
    "workerPool" "requiredCapabilities" "affinity"
  ];

  # One VirtualMachine. `image` is what lib.mkVmImage returns ({ kernel, initrd, disk,
  # cmdline } as paths or strings); `network = "bridge"` adds one NIC with a derived TAP/MAC.
  virtualMachine = { name, namespace ? "default", defaults ? { } }: desc:
    let
      d = check "vms.${name}" vmKeys (defaults // desc);
      image = d.image or { };
      str = x: if x == null then null else toString x;
      boot = {
        kernel = str (d.kernel or image.kernel or null);
        initramfs = str (d.initramfs or image.initrd or null);
        cmdline = d.cmdline or image.cmdline or null;
        firmware = str (d.firmware or null);
      };
      # The image's disk is a base image: each VM (each replica) gets its own copy-on-write
      # overlay of it on its node, never a shared writable file. A store path is realised
      # on the node (from image.nixCache when given).
      disk = if image ? disk then toString image.disk else null;
      inStore = if disk == null then null else builtins.match "(/nix/store/[^/]+)(/(.+))?" disk;
      rootImage =
        if disk == null then null
        else clean ({
          onMove = image.onMove or null;
          sha256 = image.sha256 or null;
        } // (if inStore == null then { path = disk; } else {
          nixStorePath = elemAt inStore 0;
          nixFile = elemAt inStore 2;
          nixCache = image.nixCache or null;
        }));
      nics =
        (d.interfaces or [ ])
        ++ (if (d.network or null) == "bridge" then [{
          name = "eth0";
          tap = tapFor "${namespace}/${name}";
          mac = macFor "${namespace}/${name}";
        }] else [ ]);
    in
    clean {
      inherit apiVersion;
      kind = "VirtualMachine";
      metadata = {
        inherit name;
        namespace = d.namespace or namespace;
        labels = d.labels or { };
        annotations = d.annotations or { };
      };
      spec = {
        cpus = d.cpus or 1;
        maxCpus = d.maxCpus or null;
        memory = d.memory or "512Mi";
        maxMemory = d.maxMemory or null;
        liveMigration = d.liveMigration or null;
        inherit boot;
        image = rootImage;
        disks = d.disks or [ ];
        interfaces = nics;
        vsock = d.vsock or null;
        serial = d.serial or null;
        console = d.console or null;
        runStrategy = d.runStrategy or null;
        powerState = d.powerState or null;
        nodeSelector = d.nodeSelector or { };
        workerPool = d.workerPool or null;
        requiredCapabilities = d.requiredCapabilities or [ ];
        affinity = d.affinity or null;
      };
    };

  # `replicas = n` expands to <name>-0 .. <name>-(n-1), each with its own TAP and MAC.
  expandVms = namespace: defaults: vms:
    concatLists (map
      (name:
        let desc = vms.${name}; n = desc.replicas or null; in
        if n == null then [ (virtualMachine { inherit name namespace defaults; } desc) ]
        else genList
          (i: virtualMachine { name = "${name}-${toString i}"; inherit namespace defaults; }
            (removeAttrs desc [ "replicas" ]))
          n)
      (attrNames vms));

  nodeKeys = [ "labels" "pool" "unschedulable" "drain" "overcommit" "capacityOverride" ];

  workerNode = name: desc:
    let d = check "nodes.${name}" nodeKeys desc; in
    clean {
      inherit apiVersion;
      kind = "WorkerNode";
      metadata = { inherit name; labels = { "hyperfleet.dev/node" = name; } // (d.labels or { }); };
      spec = {
        pool = d.pool or "default";
        unschedulable = d.unschedulable or null;
        drain = d.drain or null;
        overcommit = d.overcommit or null;
        capacityOverride = d.capacityOverride or null;
      };
    };

  jobKeys = [
    "namespace" "labels" "operation" "payloadVersion" "data" "target" "priority" "maxAttempts"
    "timeoutSeconds" "idempotencyKey" "workerPool" "requiredCapabilities" "nodeNames"
  ];

  # One VmJob (protocol 1.0): `operation` + `data`, optionally aimed at VM `target`.
  vmJob = { name, namespace ? "default" }: desc:
    let
      d = check "jobs.${name}" jobKeys desc;
      ns = d.namespace or namespace;
    in
    clean {
      inherit apiVersion;
      kind = "VmJob";
      metadata = { inherit name; namespace = ns; labels = d.labels or { }; };
      spec = {
        version = "1.0";
        operation = d.operation;
        payload = {
          type = "${d.operation}.v${toString (d.payloadVersion or 1)}";
          data = d.data or { };
        };
        execution = {
          priority = d.priority or null;
          maxAttempts = d.maxAttempts or null;
          timeoutSeconds = d.timeoutSeconds or null;
          idempotencyKey = d.idempotencyKey or null;
        };
        constraints.requiredCapabilities = d.requiredCapabilities or [ ];
        routing = {
          workerPool = d.workerPool or null;
          targetVm = if d ? target then { name = d.target; } else null;
          affinity = if d ? nodeNames then { nodeNames = d.nodeNames; } else null;
        };
      };
    };

  clusterKeys = [ "namespace" "defaults" "nodes" "vms" "jobs" ];

  # The whole cluster, WorkerNodes first (the order a GitSource applies them in).
  manifests = cluster:
    let
      c = check "cluster" clusterKeys cluster;
      namespace = c.namespace or "default";
      defaults = c.defaults or { };
      nodes = c.nodes or { };
      jobs = c.jobs or { };
    in
    (map (name: workerNode name nodes.${name}) (attrNames nodes))
    ++ expandVms namespace defaults (c.vms or { })
    ++ (map (name: vmJob { inherit name namespace; } jobs.${name}) (attrNames jobs));
in
{
  inherit apiVersion manifests virtualMachine workerNode vmJob macFor tapFor;
}
