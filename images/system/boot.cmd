# Lichen A/B boot for U-Boot (arm64), compiled to boot.scr (mkimage -T script) by
# images/build; U-Boot's distro boot finds it on the boot FAT.
#
# Boot state: RAUC's variables (BOOT_ORDER "A B" or "B A", BOOT_A_LEFT, BOOT_B_LEFT: tries
# left, 0-3) in a redundant U-Boot environment of two files on the boot FAT, each
# 0x4000 bytes laid out as libubootenv reads it (fw_printenv -c with two lines):
#   lichen/uboot.env, lichen/uboot-redund.env: CRC32 (4 bytes, little-endian) of the data,
#   a flags byte (the newer valid copy has the higher, 0 follows 0xff), then the data
#   ("name=value" strings, each ending in a NUL, a NUL after the last).
# The newer copy with a good CRC is read; the other is written with the next flags value,
# so a write cut short leaves the last good state. Each boot takes the first slot in
# BOOT_ORDER with tries left and takes one try. When every counter is 0 all are reset to 3,
# so a board is never stuck here. The agent resets the booted slot's counter to 3 once the
# boot is confirmed good, and arms an update with BOOT_ORDER "<new> <old>" and one try.
#
# U-Boot's `env import -c`/`env export -c` read and write a block without the flags byte
# (CRC then data), so each copy is rearranged in memory on its way in and out.
# @CMDLINE@ is replaced by images/build with the target's kernel arguments.

setenv lichen_dev ${devtype} ${devnum}:${distro_bootpart}
setenv env_raw 0x40300000
setenv env_tmp 0x40308000
setenv env_exp 0x40310000

# Reads the copy in file ${env_file} into ${o} ${a} ${b}; g=1 if its CRC is good, f=flags.
setenv read_copy '
  setenv g 0; setenv f 0; setenv BOOT_ORDER; setenv BOOT_A_LEFT; setenv BOOT_B_LEFT;
  if fatload ${lichen_dev} ${env_raw} ${env_file} 0x4000; then
    if test "${filesize}" = "4000"; then
      cp.b ${env_raw} ${env_tmp} 4;
      setexpr src ${env_raw} + 5; setexpr dst ${env_tmp} + 4; cp.b ${src} ${dst} 3ffb;
      if env import -c ${env_tmp} 3fff BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
        setenv g 1; setexpr src ${env_raw} + 4; setexpr.b f *${src};
      fi;
    fi;
  fi'

# Writes BOOT_* into the copy that is not the current one, with the next flags value.
setenv save_state '
  if test "${cur}" = "1"; then setenv env_file lichen/uboot-redund.env; setenv nextcur 2;
  else setenv env_file lichen/uboot.env; setenv nextcur 1; fi;
  if itest.b ${fcur} -eq 0xff; then setenv nf 0; else setexpr nf ${fcur} + 1; fi;
  env export -c -s 3fff ${env_exp} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT;
  mw.b ${env_tmp} 0 0x4000;
  cp.b ${env_exp} ${env_tmp} 4;
  setexpr dst ${env_tmp} + 4; mw.b ${dst} ${nf};
  setexpr src ${env_exp} + 4; setexpr dst ${env_tmp} + 5; cp.b ${src} ${dst} 3ffb;
  if fatwrite ${lichen_dev} ${env_tmp} ${env_file} 0x4000; then
    setenv cur ${nextcur}; setenv fcur ${nf};
  else
    echo "lichen: cannot write ${env_file}";
  fi'

setenv env_file lichen/uboot.env
run read_copy
setenv g1 ${g}; setenv f1 ${f}; setenv o1 ${BOOT_ORDER}; setenv a1 ${BOOT_A_LEFT}; setenv b1 ${BOOT_B_LEFT}
setenv env_file lichen/uboot-redund.env
run read_copy
setenv g2 ${g}; setenv f2 ${f}; setenv o2 ${BOOT_ORDER}; setenv a2 ${BOOT_A_LEFT}; setenv b2 ${BOOT_B_LEFT}

setenv cur 0
setenv fcur 0
if test "${g1}" = "1"; then setenv cur 1; fi
if test "${g2}" = "1"; then
  if test "${cur}" = "0"; then
    setenv cur 2
  else
    if itest.b ${f2} -gt ${f1}; then setenv cur 2; fi
    if itest.b ${f1} -eq 0xff; then if itest.b ${f2} -eq 0; then setenv cur 2; fi; fi
    if itest.b ${f2} -eq 0xff; then if itest.b ${f1} -eq 0; then setenv cur 1; fi; fi
  fi
fi
if test "${cur}" = "1"; then
  setenv fcur ${f1}; setenv BOOT_ORDER ${o1}; setenv BOOT_A_LEFT ${a1}; setenv BOOT_B_LEFT ${b1}
fi
if test "${cur}" = "2"; then
  setenv fcur ${f2}; setenv BOOT_ORDER ${o2}; setenv BOOT_A_LEFT ${a2}; setenv BOOT_B_LEFT ${b2}
fi

setenv valid 0
if test "${BOOT_ORDER}" = "A B"; then setenv valid 1; fi
if test "${BOOT_ORDER}" = "B A"; then setenv valid 1; fi
if test "${valid}" = "0"; then
  echo "lichen: no valid boot state; starting again from BOOT_ORDER=\"A B\""
  setenv BOOT_ORDER A B; setenv BOOT_A_LEFT 3; setenv BOOT_B_LEFT 3
fi
# A counter that is not 0-3 counts as 0.
for v in A B; do
  if test "${v}" = "A"; then setenv left ${BOOT_A_LEFT}; else setenv left ${BOOT_B_LEFT}; fi
  setenv ok 0
  for n in 0 1 2 3; do if test "${left}" = "${n}"; then setenv ok 1; fi; done
  if test "${ok}" = "0"; then
    if test "${v}" = "A"; then setenv BOOT_A_LEFT 0; else setenv BOOT_B_LEFT 0; fi
  fi
done

setenv take_try '
  setenv slot;
  for s in ${BOOT_ORDER}; do
    if test -z "${slot}"; then
      if test "${s}" = "A"; then setenv left ${BOOT_A_LEFT}; else setenv left ${BOOT_B_LEFT}; fi;
      if test ${left} -gt 0; then
        setenv slot ${s};
        setexpr left ${left} - 1;
        if test "${s}" = "A"; then setenv BOOT_A_LEFT ${left}; else setenv BOOT_B_LEFT ${left}; fi;
      fi;
    fi;
  done'

run take_try
if test -z "${slot}"; then
  echo "lichen: no slot has tries left; resetting every counter to 3"
  setenv BOOT_A_LEFT 3; setenv BOOT_B_LEFT 3
  run take_try
fi
run save_state

if test "${slot}" = "A"; then setenv slotdir a; setenv label rootfs-a; else setenv slotdir b; setenv label rootfs-b; fi
echo "lichen: booting slot ${slot} (BOOT_ORDER=\"${BOOT_ORDER}\" BOOT_A_LEFT=${BOOT_A_LEFT} BOOT_B_LEFT=${BOOT_B_LEFT})"
setenv bootargs lichen.slot=${slot} lichen.root=${label} @CMDLINE@
if fatload ${lichen_dev} ${kernel_addr_r} ${slotdir}/Image; then
  if fatload ${lichen_dev} ${ramdisk_addr_r} ${slotdir}/initrd.img; then
    booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
  fi
fi
echo "lichen: slot ${slot} has no bootable kernel; taking its tries and resetting"
if test "${slot}" = "A"; then setenv BOOT_A_LEFT 0; else setenv BOOT_B_LEFT 0; fi
run save_state
reset
