# The desired fleet; see docs/git-layout.md for every attribute.
{
  namespace = "default";
  defaults = { memory = "512Mi"; };

  vms.hello = {
    cpus = 1;
    kernel = "/var/lib/hyperfleet/images/vmlinux";
    cmdline = "console=ttyS0";
  };
}
