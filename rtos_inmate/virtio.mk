# rtos_inmate/virtio.mk - build rules of the virtio-over-ivshmem side of the
# inmate (core/virtqueue, core/virtio_ivshmem, core/virtio_can, the hosted
# link hal/hosted/simlink and the hosted program hal/hosted/inmate_main).
#
# Standalone:   make -C rtos_inmate -f virtio.mk [virtio-hosted|virtio-cross|virtio-layout|virtio-test]
# From the main Makefile (one line at its end: `include virtio.mk`), the
# targets hosted, cross and test build and check these too.
#
#   virtio-hosted  build/virtio/hosted_inmate: the whole cell as a Linux
#                  process (MCP2515 simulator + sim hub), -Wall -Wextra -Werror;
#                  SANITIZE=1 builds build/virtio-asan/hosted_inmate with ASan +
#                  UBSan (INMATE_SANITIZE=1 runs the tests against it)
#   virtio-cross   core/ and drivers/ for aarch64, freestanding, no libc,
#                  then checks that only hal_* (and mem*) symbols stay undefined
#   virtio-layout  include/shared_layout.h equals the Python generator's output
#   virtio-test    the pytest files of this side (end to end over the sim link)
#   virtio-jailhouse-check JAILHOUSE_DIR=...
#                  compiles hal/jailhouse_rpi4/ivshmem_rpi4.c (the link HAL on the
#                  Jailhouse ivshmem device) against a Jailhouse tree's inmate
#                  headers, without a kernel tree; the real build is `make jailhouse`

V_HOSTCC  ?= gcc
V_CROSS   ?= aarch64-linux-gnu-
V_PYTHON  ?= $(if $(wildcard ../.venv/bin/python),../.venv/bin/python,python3)
V_SANITIZE ?= $(if $(SANITIZE),$(SANITIZE),0)
V_BUILD   := $(if $(filter 1,$(V_SANITIZE)),build/virtio-asan,build/virtio)

V_WARN := -Wall -Wextra -Werror -Wstrict-prototypes -Wmissing-prototypes \
          -Wmissing-declarations -Wshadow -Wpointer-arith -Wvla -Wundef
V_INC  := -Iinclude -Icore -Idrivers

V_PORTABLE   := $(wildcard core/*.c) $(wildcard drivers/*.c)
V_HOSTED_SRC := hal/hosted/hal_hosted.c hal/hosted/simlink.c hal/hosted/inmate_main.c

V_HOSTED_CFLAGS := -std=c11 -O2 -g $(V_WARN) $(V_INC) -Ihal/hosted
V_HOSTED_LDFLAGS :=
ifeq ($(V_SANITIZE),1)
# SANITIZE=1: AddressSanitizer + UBSan into build/virtio-asan, abort on any report
V_HOSTED_CFLAGS  += -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
V_HOSTED_LDFLAGS += -fsanitize=address,undefined
endif
V_HOSTED_OBJ    := $(patsubst %.c,$(V_BUILD)/hosted/%.o,$(V_PORTABLE) $(V_HOSTED_SRC))

V_CROSS_CFLAGS := -std=c11 -O2 -ffreestanding -fno-builtin -nostdlib \
                  -fno-stack-protector -fno-pic $(V_WARN) $(V_INC)
V_CROSS_OBJ    := $(patsubst %.c,$(V_BUILD)/cross/%.o,$(V_PORTABLE))

.PHONY: virtio-hosted virtio-cross virtio-layout virtio-test virtio-clean virtio-jailhouse-check

virtio-hosted: $(V_BUILD)/hosted_inmate

$(V_BUILD)/hosted_inmate: $(V_HOSTED_OBJ)
	$(V_HOSTCC) $(V_HOSTED_LDFLAGS) -o $@ $^

$(V_BUILD)/hosted/%.o: %.c
	@mkdir -p $(dir $@)
	$(V_HOSTCC) $(V_HOSTED_CFLAGS) -MMD -MP -c $< -o $@

$(V_BUILD)/cross/%.o: %.c
	@mkdir -p $(dir $@)
	$(V_CROSS)gcc $(V_CROSS_CFLAGS) -MMD -MP -c $< -o $@

virtio-cross: $(V_CROSS_OBJ)
	$(V_CROSS)ld -r -o $(V_BUILD)/cross/portable.o $(V_CROSS_OBJ)
	@undef=$$($(V_CROSS)nm -u $(V_BUILD)/cross/portable.o | awk '{print $$2}' \
	          | grep -v -E '^(hal_[a-z_]+|memcpy|memset|memmove|memcmp)$$' || true); \
	if [ -n "$$undef" ]; then echo "unexpected external symbols:"; echo "$$undef"; exit 1; fi; \
	echo "virtio-cross: core/ and drivers/ build for arm64; external symbols are HAL only"
	@$(V_CROSS)size $(patsubst %.c,$(V_BUILD)/cross/%.o,core/virtqueue.c core/virtio_ivshmem.c core/virtio_can.c)

virtio-layout:
	cd .. && $(V_PYTHON) -m ivshmem_virtio.spec.cgen | diff -u rtos_inmate/include/shared_layout.h - \
	  || { echo "shared_layout.h is stale: python -m ivshmem_virtio.spec.cgen > rtos_inmate/include/shared_layout.h"; exit 1; }

virtio-test: virtio-hosted
	cd .. && $(V_PYTHON) -m pytest -q tests/inmate/test_layout_gen.py tests/inmate/test_virtio_inmate.py

virtio-clean:
	rm -rf $(V_BUILD)

V_JH := $(JAILHOUSE_DIR)
virtio-jailhouse-check:
	@if [ ! -f "$(V_JH)/inmates/lib/arm-common/include/inmate.h" ]; then \
	  echo "usage: make -f virtio.mk virtio-jailhouse-check JAILHOUSE_DIR=/path/to/jailhouse"; exit 2; fi
	@mkdir -p $(V_BUILD)/jailhouse
	$(V_CROSS)gcc -std=gnu11 -O2 -ffreestanding -nostdinc -fno-pic -fno-stack-protector \
	  -isystem $$($(V_CROSS)gcc -print-file-name=include) $(V_WARN) \
	  -I$(V_JH)/inmates/lib/arm64/include -I$(V_JH)/inmates/lib/arm-common/include \
	  -I$(V_JH)/include/arch/arm64 -I$(V_JH)/inmates/lib/include -I$(V_JH)/include \
	  $(V_INC) -Ihal/jailhouse_rpi4 -c hal/jailhouse_rpi4/ivshmem_rpi4.c \
	  -o $(V_BUILD)/jailhouse/ivshmem_rpi4.o
	@echo "virtio-jailhouse-check: ivshmem_rpi4.c builds against $(V_JH); it needs:"
	@$(V_CROSS)nm -u $(V_BUILD)/jailhouse/ivshmem_rpi4.o | awk '{print "  " $$2}'

-include $(shell find $(V_BUILD) -name '*.d' 2>/dev/null)

# Hook into the main Makefile's targets when included from it; standalone,
# the first goal is virtio-hosted.
ifeq ($(origin PORTABLE_SRC),undefined)
.DEFAULT_GOAL := virtio-hosted
else
hosted: virtio-hosted
cross: virtio-cross
test: virtio-hosted
endif
