
from pathlib import Path as _Path

#: A file to name as a VM's kernel where the CH double runs it: the double, like the real
#: VMM, refuses vm.boot when payload.kernel does not exist, but reads nothing from it.
PLACEHOLDER_KERNEL = str(_Path(__file__).resolve().parent / "placeholder-vmlinux")
