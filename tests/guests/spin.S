# Prints a line, then spins forever at CPL0 with interrupts off: only a signal ends rvmm.
.code64
.globl _start
_start:
    cli
    lea msg(%rip), %rbx
    mov $0x3f8, %dx
2:  mov (%rbx), %al
    test %al, %al
    jz 1f
    out %al, %dx
    inc %rbx
    jmp 2b
1:  pause
    jmp 1b
msg: .asciz "RVMM-TINY spinning\n"
