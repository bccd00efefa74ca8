# The bench's tiny guest: prints one line on COM1, then exits (or, built with -DIDLE, halts
# until it is killed). One ELF carries two entries:
#  - e_entry, the 64-bit entry rvmm enters; exit is an i8042 reset (port 0x64 ← 0xfe);
#  - a Xen PVH note pointing at a 32-bit entry, which QEMU's microvm uses; exit is QEMU's
#    isa-debug-exit device at port 0xf4.
# Built with -DSPIN=N it first runs N iterations of a 2-instruction loop at CPL0, which tells
# how fast this host runs guest kernel code.
.section .note.Xen, "a", @note
    .p2align 2
    .long 4, 8, 18              # namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .quad pvh_start

.text
.code64
.globl _start
_start:
#ifdef SPIN
    mov $SPIN, %ecx
0:  dec %ecx
    jnz 0b
#endif
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:
#ifndef IDLE
    mov $0xfe, %al
    out %al, $0x64
#endif
3:  hlt
    jmp 3b

.code32
pvh_start:
#ifdef SPIN
    mov $SPIN, %ecx
0:  dec %ecx
    jnz 0b
#endif
    mov $msg, %esi
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp 4b
5:
#ifndef IDLE
    xor %eax, %eax
    out %al, $0xf4
#endif
6:  hlt
    jmp 6b

msg: .asciz "RVMM-BENCH hello\n"
