# The steps of the vhost-user-blk guest's plan (tests/guest/plan.py writes the plan; /init sources
# this, and a shell booted without a plan has it as $ENV). Each returns non-zero when it failed.
set -o pipefail
DEV=/dev/vda
Q=/sys/block/vda/queue

# w SEED OFF LEN BS MODE: write the pattern of SEED over [OFF, OFF+LEN) with dd bs=BS;
#   MODE direct (O_DIRECT), buffered (page cache) or fsync (page cache, then fsync)
w() {
    case "$5" in
        direct) vdtool pat "$1" "$2" "$3" | dd of=$DEV bs="$4" seek="$2" \
                    oflag=seek_bytes,direct iflag=fullblock status=none ;;
        buffered) vdtool pat "$1" "$2" "$3" | dd of=$DEV bs="$4" seek="$2" \
                    oflag=seek_bytes iflag=fullblock status=none ;;
        fsync) vdtool pat "$1" "$2" "$3" | dd of=$DEV bs="$4" seek="$2" \
                    oflag=seek_bytes iflag=fullblock conv=fsync status=none ;;
        *) echo "bad mode $5"; return 2 ;;
    esac
}
# r OFF LEN BS MODE SEED:LEN...: read [OFF, OFF+LEN) with dd bs=BS (MODE direct or buffered)
#   and compare with the segments (seed 0: zeros, seed s: not checked)
r() {
    off=$1 len=$2 bs=$3 mode=$4
    shift 4
    if [ "$mode" = direct ]; then fl=skip_bytes,count_bytes,direct; else fl=skip_bytes,count_bytes; fi
    dd if=$DEV bs="$bs" skip="$off" count="$len" iflag=$fl status=none | vdtool chk "$off" "$@"
}
d() { blkdiscard -o "$1" -l "$2" $DEV; }              # discard
z() { vdtool zero $DEV "$1" "$2"; }                   # write-zeroes (BLKZEROOUT, no unmap)
p() { vdtool punch $DEV "$1" "$2"; }                  # write-zeroes with unmap, no fallback
flush() {                                             # everything to the device, caches dropped
    sync && blockdev --flushbufs $DEV && echo 3 > /proc/sys/vm/drop_caches
}
rofail() {                                            # a read-only disk refuses every write
    [ "$(cat /sys/block/vda/ro)" = 1 ] || { echo "/sys/block/vda/ro is not 1"; return 1; }
    [ "$(blockdev --getro $DEV)" = 1 ] || { echo "blockdev --getro is not 1"; return 1; }
    vdtool wrfail $DEV || return 1
    if dd if=/dev/zero of=$DEV bs=512 count=1 oflag=direct conv=notrunc status=none; then
        echo "dd wrote to the read-only disk"; return 1
    fi
}
info() {
    echo "GT: info size=$(cat /sys/block/vda/size) bytes=$(blockdev --getsize64 $DEV)" \
         "ro=$(cat /sys/block/vda/ro) discard_max_bytes=$(cat $Q/discard_max_bytes)" \
         "discard_granularity=$(cat $Q/discard_granularity)" \
         "write_zeroes_max_bytes=$(cat $Q/write_zeroes_max_bytes)" \
         "max_sectors_kb=$(cat $Q/max_sectors_kb) max_segments=$(cat $Q/max_segments)" \
         "nr_hw_queues=$(ls /sys/block/vda/mq | wc -l)" \
         "features=$(cat /sys/block/vda/device/features)"
}
# op ID STEP ARGS...: run one step, say how it went
op() {
    id=$1
    shift
    if out=$("$@" 2>&1); then
        echo "GT: ok $id"
    else
        echo "GT: FAIL $id ($*): $(echo "$out" | tr '\n' ' ')"
    fi
}
