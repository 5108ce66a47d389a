#!/bin/sh
# Build the Raspberry Pi 4 cell configs of the CAN cell (and of the Linux virtio guest next to it)
# the way Jailhouse's configs/Makefile does, and check them with Jailhouse's
# tools/jailhouse-config-check and with check_coexistence.py (what config-check leaves out).
#
#   rtos_inmate/configs/check-configs.sh JAILHOUSE_DIR [OUTDIR]
#
# JAILHOUSE_DIR: a Jailhouse source tree (checked with e57d1ef); OUTDIR (default
# /tmp/rpi4-can-configs) gets configs/arm64/ with the copied and edited sources and the .cell
# files. CROSS_COMPILE defaults to aarch64-linux-gnu-. No kernel tree is needed: the flags are
# those of configs/Makefile (-Werror -Wall -Wextra -D__LINUX_COMPILER_TYPES_H and its include
# path) plus what Kbuild adds to every file (-nostdinc -D__KERNEL__ -mlittle-endian), and the
# .cell is objcopy -O binary --remove-section=.note.gnu.property of the object, as there.
#
# Setups (upstream rpi4.c edited as rpi4-can-root.h describes):
#   can        root + rpi4-can-root.h;  cells: rpi4-can-inmate
#   can+demo   the same root;           cells: rpi4-can-inmate, upstream rpi4-linux-demo
#   can+linux  root + docs/jailhouse-cells/rpi4-virtio-root.h + rpi4-can-root.h;
#              cells: rpi4-can-inmate, docs/jailhouse-cells/rpi4-linux-virtio
# and one that must be refused (the checker is not blind): upstream rpi4-inmate-demo next to the
# CAN cell (same CPU 1, its RAM is the link's memory).
# Exit status 0 only if every build and every check passed.
set -eu

if [ $# -lt 1 ] || [ ! -f "$1/configs/arm64/rpi4.c" ]; then
	echo "usage: $0 JAILHOUSE_DIR [OUTDIR]   (JAILHOUSE_DIR/configs/arm64/rpi4.c must exist)" >&2
	exit 2
fi
J=$(cd "$1" && pwd)
OUT=${2:-/tmp/rpi4-can-configs}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CROSS_COMPILE=${CROSS_COMPILE-aarch64-linux-gnu-}
CC=${CROSS_COMPILE}gcc
OBJCOPY=${CROSS_COMPILE}objcopy
PY=${PYTHON:-python3}
CELLS=$REPO/docs/jailhouse-cells
# INTIDs of BCM2711 devices (bcm2711.dtsi, bcm2711-rpi-ds.dtsi) near the vPCI range:
# PCIe 175-180, GENET 189-190, xHCI 208
HW_IRQS=175,176,177,178,179,180,189,190,208

D=$OUT/configs/arm64
rm -rf "$OUT"
mkdir -p "$D"
cp "$J/configs/arm64/rpi4.c" "$J/configs/arm64/rpi4-linux-demo.c" \
   "$J/configs/arm64/rpi4-inmate-demo.c" "$HERE/rpi4-can-root.h" \
   "$HERE/rpi4-can-inmate.c" "$D/"
cp "$CELLS/rpi4-virtio-root.h" "$CELLS/rpi4-linux-virtio.c" "$D/"

# rpi4.c -> rpi4-can.c (CAN fragment only) and rpi4-can-linux.c (both fragments)
patch_root() { # $1 = output name, $2 = 1 to add rpi4-virtio-root.h as well
	"$PY" - "$D/rpi4.c" "$D/$1" "$2" <<'EOF'
import re, sys
src, dst, linux = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
s = open(src).read()

def sub(pattern, repl):
    global s
    s, n = re.subn(pattern, repl, s, flags=re.S)
    if n != 1:
        sys.exit(f"{src}: expected one match of {pattern!r}, found {n}")

inc = ('#include "rpi4-virtio-root.h"\n' if linux else "") + '#include "rpi4-can-root.h"\n'
sub(r"(#include <jailhouse/cell-config.h>\n)", r"\1" + inc)
extra = 8 + 4 if linux else 4
sub(r"struct jailhouse_memory mem_regions\[(\d+)\];",
    lambda m: f"struct jailhouse_memory mem_regions[{int(m.group(1)) + extra}];")
sub(r"struct jailhouse_pci_device pci_devices\[(\d+)\];",
    lambda m: f"struct jailhouse_pci_device pci_devices[{int(m.group(1)) + (3 if linux else 1)}];")
sub(r"(/\* RAM \(0M-~506M\) \*/ \{.*?\.size = )0x1fa10000,", r"\1RPI4_CAN_ROOT_RAM0_END,")
regions = ("\t\tIVV_RPI4_ROOT_MEM_REGIONS,\n" if linux else "") + "\t\tRPI4_CAN_ROOT_MEM_REGIONS,\n"
sub(r"(\t\t\},\n)(\t\},\n\n\t\.irqchips)", lambda m: m.group(1) + regions + m.group(2))
devices = ("\t\tIVV_RPI4_ROOT_PCI_DEVICES,\n" if linux else "") + "\t\tRPI4_CAN_ROOT_PCI_DEVICES,\n"
sub(r"(\t\t\},\n)(\t\},\n\};\s*$)", lambda m: m.group(1) + devices + m.group(2))
open(dst, "w").write(s)
EOF
}
patch_root rpi4-can.c 0
patch_root rpi4-can-linux.c 1
rm "$D/rpi4.c"   # only the edited copies are cells here

cell() { # build $D/$1.c -> $D/$1.cell like configs/Makefile
	"$CC" -nostdinc -D__KERNEL__ -mlittle-endian \
		-I"$J/hypervisor/arch/arm64/include" -I"$J/hypervisor/include" -I"$J/include" \
		-Werror -Wall -Wextra -D__LINUX_COMPILER_TYPES_H \
		-c "$D/$1.c" -o "$D/$1.o"
	"$OBJCOPY" -O binary --remove-section=.note.gnu.property "$D/$1.o" "$D/$1.cell"
	echo "built configs/arm64/$1.cell ($(wc -c < "$D/$1.cell") bytes)"
}
for c in rpi4-can rpi4-can-linux rpi4-can-inmate rpi4-linux-virtio rpi4-linux-demo \
	 rpi4-inmate-demo; do
	cell "$c"
done

status=0
check() { # $1 = setup name, $2 = root cell, rest = non-root cells
	name=$1; root=$2; shift 2
	echo
	echo "=== $name: jailhouse-config-check $root $*"
	(cd "$D" && PYTHONPATH="$J" "$PY" "$J/tools/jailhouse-config-check" "$root" "$@") || status=1
	echo "=== $name: check_coexistence.py $root $*"
	(cd "$D" && "$PY" "$HERE/check_coexistence.py" --jailhouse "$J" --hw-irqs "$HW_IRQS" \
		"$root" "$@") || status=1
}
check can rpi4-can.cell rpi4-can-inmate.cell
check can+demo rpi4-can.cell rpi4-can-inmate.cell rpi4-linux-demo.cell
check can+linux rpi4-can-linux.cell rpi4-can-inmate.cell rpi4-linux-virtio.cell
echo
echo "=== must be refused: check_coexistence.py rpi4-can.cell rpi4-can-inmate.cell rpi4-inmate-demo.cell"
out=$(cd "$D" && "$PY" "$HERE/check_coexistence.py" --jailhouse "$J" \
	rpi4-can.cell rpi4-can-inmate.cell rpi4-inmate-demo.cell) && rc=0 || rc=$?
printf '%s\n' "$out" | grep -E "ERROR|Coexistence" || true
if [ "$rc" -eq 1 ]; then
	echo "refused, as it must be"
else
	echo "not refused (exit status $rc)"; status=1
fi
echo
if [ $status -eq 0 ]; then echo "all checks passed ($D)"; else echo "CHECKS FAILED ($D)"; fi
exit $status
